//! Batch-bound column keys over TCP: a key asked for batch k decrypts batch k only, unbound
//! requests are refused, and the rank budget refuses a request past it, whole, per batch,
//! also when two callers race for a batch's last rank.
#![allow(clippy::unwrap_used)]

use cryptonn::authority::{self, AuthorityError, InitOptions, Policy, ServerConfig, ServerHandle};
use cryptonn::protocol::{
    AuthorityClient, BatchId, ProtocolError, PublicParams, Request, MAX_BATCH_PARAMS,
};
use fe::dlog::DlogTable;
use fe::feip::{FeipEncryptor, FeipPublicKey};
use fe::Ristretto;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

const BATCH: usize = 8;
/// The dataset the tests' batches belong to.
const DATA: [u8; 16] = [7; 16];

/// Batch `batch` of [`DATA`].
fn b(batch: u32) -> BatchId {
    BatchId {
        dataset: DATA,
        batch,
    }
}

struct Server {
    handle: ServerHandle,
    addr: String,
    token: String,
    audit: PathBuf,
    params: PublicParams,
    dir: Arc<tempfile::TempDir>,
}

fn start(budget: Option<usize>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    authority::init(
        dir.path(),
        nn::mnist::info(),
        BATCH,
        &InitOptions::default(),
    )
    .unwrap();
    serve(Arc::new(dir), budget).unwrap()
}

/// Serves the keys in `dir` (again, after a restart) with a binding policy.
fn serve(dir: Arc<tempfile::TempDir>, budget: Option<usize>) -> Result<Server, AuthorityError> {
    let token = authority::read_token(dir.path()).unwrap();
    let audit = dir.path().join(authority::AUDIT_FILE);
    let mut config = ServerConfig::new(token.clone(), &audit);
    config.policy = Policy {
        bind_batches: true,
        batch_rank_budget: budget,
        ..Policy::default()
    };
    let auth = authority::load(dir.path()).unwrap();
    let handle = authority::spawn(TcpListener::bind("127.0.0.1:0").unwrap(), auth, config)?;
    Ok(Server {
        addr: handle.local_addr().to_string(),
        params: authority::read_params(&dir.path().join(authority::PARAMS_FILE)).unwrap(),
        handle,
        token,
        audit,
        dir,
    })
}

fn connect(s: &Server) -> AuthorityClient {
    AuthorityClient::connect(&s.addr, &s.token).unwrap()
}

fn refused(r: Result<impl std::fmt::Debug, ProtocolError>) -> String {
    match r {
        Err(ProtocolError::Refused { message: m, .. }) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// `e_i + e_j`: two non-zero entries, as the column rule asks.
fn pair(i: usize, j: usize) -> Vec<i64> {
    let mut v = vec![0; BATCH];
    v[i] += 1;
    v[j] += 1;
    v
}

fn inner(x: &[i64], y: &[i64]) -> i64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

#[test]
fn a_bound_key_decrypts_its_batch_and_nothing_else() {
    let s = start(None);
    let mut c = connect(&s);
    let published = c.published().unwrap();
    assert!(published.policy.bind_batches);
    let keys: Vec<FeipPublicKey<Ristretto>> = c.batch_col_params(&s.params, DATA, 3).unwrap();
    assert_eq!(keys.len(), 3);
    assert_ne!(keys[0], keys[1]);
    assert_ne!(keys[0], s.params.col);
    // The same keys on another connection: they are a function of the authority's keys.
    assert_eq!(
        connect(&s).batch_col_params(&s.params, DATA, 3).unwrap(),
        keys
    );

    let x: Vec<i64> = vec![255, 0, 17, 3, 99, 1, 200, 42];
    let y = vec![3, -1, 0, 2, 7, -5, 1, 1];
    let cp = s.params.col.params();
    let dlog = DlogTable::<Ristretto>::new(1 << 16).unwrap();
    let ct = |pk: &FeipPublicKey<Ristretto>| FeipEncryptor::new(pk).encrypt(&x).unwrap();
    let (ct0, ct1, shared) = (ct(&keys[0]), ct(&keys[1]), ct(&s.params.col));
    let k0 = c
        .bound_col_keys(b(0), false, std::slice::from_ref(&y))
        .unwrap();
    assert_eq!(
        fe::feip::decrypt(&cp, &ct0, &k0[0], &dlog),
        Ok(inner(&x, &y))
    );
    for other in [&ct1, &shared] {
        assert!(
            fe::feip::decrypt(&cp, other, &k0[0], &dlog).is_err(),
            "a key for batch 0 must decrypt nothing in range elsewhere"
        );
    }
    let k1 = c
        .bound_col_keys(b(1), false, std::slice::from_ref(&y))
        .unwrap();
    assert_eq!(
        fe::feip::decrypt(&cp, &ct1, &k1[0], &dlog),
        Ok(inner(&x, &y))
    );

    // Batch 0 of another dataset (another file encrypted against the same authority) has
    // its own key: the key for batch 0 of DATA decrypts nothing there.
    let other = c.batch_col_params(&s.params, [8; 16], 1).unwrap();
    assert_ne!(other[0], keys[0]);
    let ct_other = ct(&other[0]);
    assert!(fe::feip::decrypt(&cp, &ct_other, &k0[0], &dlog).is_err());

    // Unbound column keys would decrypt every batch: refused, the connection stays.
    let m = refused(c.col_keys(&[pair(0, 1)]));
    assert!(m.contains("binds column keys to batches"), "{m}");
    let m = refused(c.conv_col_keys(&[pair(0, 1)]));
    assert!(m.contains("binds column keys to batches"), "{m}");
    // The bound request obeys the column rules.
    let m = refused(c.bound_col_keys(b(2), false, &[vec![0, 0, 0, 1, 0, 0, 0, 0]]));
    assert!(m.contains("non-zero"), "{m}");
    // More batches than one request holds are fetched in pieces; one request past the
    // limit is refused.
    let many = MAX_BATCH_PARAMS + 3;
    let all = c.batch_col_params(&s.params, DATA, many).unwrap();
    assert_eq!(all.len(), many as usize);
    assert_eq!(all[..3], keys[..]);
    let m = refused(c.call(Request::BatchColParams {
        dataset: DATA,
        first: 0,
        count: MAX_BATCH_PARAMS + 1,
    }));
    assert!(m.contains("at most"), "{m}");

    // The audit log names the batch of every bound request.
    s.handle.shutdown().unwrap();
    let log = std::fs::read_to_string(&s.audit).unwrap();
    assert!(log.contains("\"batch\":0"), "{log}");
    assert!(log.contains("\"batch\":1"), "{log}");
}

#[test]
fn the_rank_budget_refuses_past_it_per_batch_and_whole() {
    let s = start(Some(5));
    let mut c = connect(&s);
    c.bound_col_keys(b(0), false, &[pair(0, 1), pair(1, 2), pair(2, 3)])
        .unwrap();
    // A vector in the span of those issued costs no rank.
    let in_span: Vec<i64> = (0..BATCH)
        .map(|i| pair(0, 1)[i] * 2 - pair(2, 3)[i])
        .collect();
    c.bound_col_keys(b(0), false, std::slice::from_ref(&in_span))
        .unwrap();
    c.bound_col_keys(b(0), false, &[pair(3, 4), pair(4, 5)])
        .unwrap();
    // Rank 5 reached: one more independent vector is refused, and with it a whole request
    // that mixes it with vectors in the span.
    let m = refused(c.bound_col_keys(b(0), false, &[in_span.clone(), pair(5, 6)]));
    assert!(
        m.contains("batch 0") && m.contains("from 5 to 6") && m.contains("budget of 5"),
        "{m}"
    );
    // Still: vectors in the span are issued, and other batches have their own budget.
    assert_eq!(c.bound_col_keys(b(0), false, &[in_span]).unwrap().len(), 1);
    let five: Vec<Vec<i64>> = (0..5).map(|i| pair(i, i + 1)).collect();
    assert_eq!(c.bound_col_keys(b(7), false, &five).unwrap().len(), 5);
    let m = refused(c.bound_col_keys(
        b(9),
        false,
        &(0..6).map(|i| pair(i, i + 1)).collect::<Vec<_>>(),
    ));
    assert!(m.contains("from 0 to 6"), "{m}");
    // A refused request issued nothing: batch 9 still has its whole budget.
    assert_eq!(c.bound_col_keys(b(9), false, &five).unwrap().len(), 5);
    s.handle.shutdown().unwrap();
    let log = std::fs::read_to_string(&s.audit).unwrap();
    assert_eq!(log.matches("\"outcome\":\"refused\"").count(), 2, "{log}");
}

#[test]
fn two_callers_cannot_both_spend_the_last_rank() {
    let s = start(Some(4));
    let mut c = connect(&s);
    c.bound_col_keys(b(3), false, &[pair(0, 1), pair(1, 2), pair(2, 3)])
        .unwrap();
    let outcomes: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = [pair(4, 5), pair(5, 6), pair(6, 7), pair(3, 7)]
            .into_iter()
            .map(|v| {
                let s = &s;
                scope.spawn(move || connect(s).bound_col_keys(b(3), false, &[v]).is_ok())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        outcomes.iter().filter(|ok| **ok).count(),
        1,
        "exactly one of four independent vectors fits the last rank: {outcomes:?}"
    );
    s.handle.shutdown().unwrap();
}

#[test]
fn a_restart_keeps_the_rank_spent_and_a_corrupted_journal_is_refused() {
    let s = start(Some(3));
    let mut c = connect(&s);
    c.bound_col_keys(b(4), false, &[pair(0, 1), pair(1, 2), pair(2, 3)])
        .unwrap();
    c.bound_col_keys(b(5), false, &[pair(0, 1)]).unwrap();
    let dir = s.dir.clone();
    s.handle.shutdown().unwrap();
    let journal = dir.path().join(authority::RANKS_FILE);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&journal).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // Restarted: batch 4 is still at its budget, batch 5 has 2 left.
    let s = serve(dir.clone(), Some(3)).unwrap();
    // A second authority on the same keys and budget would count apart: refused at start.
    let e = serve(dir.clone(), Some(3))
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("locked"), "{e}");
    let mut c = connect(&s);
    let m = refused(c.bound_col_keys(b(4), false, &[pair(4, 5)]));
    assert!(m.contains("from 3 to 4"), "{m}");
    c.bound_col_keys(b(5), false, &[pair(1, 2), pair(2, 3)])
        .unwrap();
    assert!(refused(c.bound_col_keys(b(5), false, &[pair(3, 4)])).contains("budget of 3"));
    s.handle.shutdown().unwrap();

    // A record cut short (a crash before its keys went out) is dropped ...
    let good = std::fs::read(&journal).unwrap();
    std::fs::write(&journal, [&good[..], &[9u8, 0, 0, 0, 1, 2]].concat()).unwrap();
    let s = serve(dir.clone(), Some(3)).unwrap();
    assert!(refused(connect(&s).bound_col_keys(b(4), false, &[pair(4, 5)])).contains("from 3"));
    s.handle.shutdown().unwrap();
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        good,
        "the torn tail is cut off"
    );
    // ... and a tampered complete record stops the authority at start.
    let mut bad = good.clone();
    bad[10] ^= 1;
    std::fs::write(&journal, &bad).unwrap();
    let e = serve(dir, Some(3)).err().expect("refused").to_string();
    assert!(e.contains("corrupted"), "{e}");
}
