//! The real FE code path inside one process: an authority serving on 127.0.0.1 (an ephemeral
//! port), the client encrypting a dataset to a temporary file with the parameters it fetched
//! over the protocol, and the trainer's secure first layer reading that file and asking the
//! authority for keys over TCP.

use anyhow::{Context, Result};
use cryptonn::authority::{self, Authority, ServerConfig, ServerHandle};
use cryptonn::client::{encrypt_dataset, ColumnKeys, EncryptSummary};
use cryptonn::dataset::Reader;
use cryptonn::protocol::AuthorityClient;
use cryptonn::secure::{SecureProducts, Timings};
use cryptonn::Curve;
use fe::dlog::DlogTable;
use ndarray::{Array2, ArrayView2};
use nn::data::Dataset;
use nn::first_layer::{FirstLayer, IntegerProducts, SeamError};
use nn::model::Model;
use nn::optim::Optimizer;
use nn::train::{train_step, StepStats, TrainError};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// A running authority and an encrypted dataset made by the client.
pub struct FeEnv {
    /// Holds the key audit log and the encrypted dataset; removed on drop.
    dir: tempfile::TempDir,
    server: Option<ServerHandle>,
    /// `host:port` of the authority.
    pub addr: String,
    /// The callers' token.
    pub token: String,
    /// The encrypted dataset file.
    pub data: PathBuf,
    /// What the client's encryption did (time, size).
    pub encryption: EncryptSummary,
    /// Seconds of the authority's key generation.
    pub setup_seconds: f64,
}

impl FeEnv {
    /// Starts an authority for batches of `batch_size` and encrypts `train` with the client.
    pub fn start(batch_size: usize, train: &Dataset, source: &str, progress: bool) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("cryptonn-experiments-")
            .tempdir()
            .context("creating a temporary directory")?;
        let t = Instant::now();
        let auth = Authority::generate(train.info.clone(), batch_size)
            .context("generating the authority's keys")?;
        let setup_seconds = t.elapsed().as_secs_f64();
        let token = authority::generate_token();
        let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        let config = ServerConfig::new(token.clone(), dir.path().join("audit.log"));
        let server = authority::spawn(listener, auth, config).context("starting the authority")?;
        let addr = server.local_addr().to_string();
        // The client fetches the public parameters over the protocol, as `client encrypt` does.
        // and the batches' column keys (the authority binds them to batches by default).
        let mut conn = AuthorityClient::connect(&addr, &token)
            .context("connecting the client to the authority")?;
        let published = conn
            .published()
            .context("fetching the public parameters from the authority")?;
        let columns = ColumnKeys::fetch(&mut conn, &published, train.len())
            .context("fetching the batches' column keys")?;
        let data = dir.path().join("train.enc");
        let encryption =
            encrypt_dataset(train, &published.params, &columns, &data, source, progress)
                .context("encrypting the training set")?;
        Ok(FeEnv {
            dir,
            server: Some(server),
            addr,
            token,
            data,
            encryption,
            setup_seconds,
        })
    }

    /// The trainer's secure first layer: opens the encrypted file (checked against the
    /// parameters the trainer fetches itself) and connects to the authority.
    pub fn products(&self, dlog: Arc<DlogTable<Curve>>) -> Result<SecureProducts<AuthorityClient>> {
        let mut client = AuthorityClient::connect(&self.addr, &self.token)
            .context("connecting the trainer to the authority")?;
        let params = client.params().context("fetching the public parameters")?;
        let reader =
            Reader::open_for(&self.data, &params).context("opening the encrypted dataset")?;
        Ok(SecureProducts::new(reader, client, params, dlog))
    }

    /// Lines of the authority's audit log (one per request that issued keys).
    pub fn audit_lines(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("audit.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for FeEnv {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.shutdown();
        }
    }
}

/// The trainer's discrete-log table (built once per process, about a second).
pub fn dlog_table() -> Result<Arc<DlogTable<Curve>>> {
    cryptonn::trainer::dlog_table(None).context("building the discrete-log table")
}

/// The samples of the given batches (fixed partition into batches of `batch_size`), in that
/// order: what the client encrypts when only these batches are needed.
pub fn batches_subset(data: &Dataset, batch_size: usize, batches: &[usize]) -> Result<Dataset> {
    let mut images = Vec::with_capacity(batches.len() * batch_size * data.features());
    let mut labels = Vec::with_capacity(batches.len() * batch_size);
    for &b in batches {
        let range = b * batch_size..(b + 1) * batch_size;
        if range.end > data.len() {
            anyhow::bail!(
                "batch {b} of {batch_size} is not complete in {} samples",
                data.len()
            );
        }
        for i in range {
            images.extend(data.values.row(i).iter().copied());
            labels.push(data.labels[i]);
        }
    }
    let images = ndarray::Array2::from_shape_vec((labels.len(), data.features()), images)?;
    Ok(Dataset::new(images, labels, data.info.clone())?)
}

/// The distinct batches that the first `steps` steps of a run visit (batches of the fixed
/// partition into `num_batches`, shuffled per epoch with `seed` as the training loop does),
/// in the order of their first visit: what the client must encrypt for those steps.
pub fn visited_batches(num_batches: usize, seed: u64, epochs: usize, steps: usize) -> Vec<usize> {
    let mut seen = vec![false; num_batches];
    (0..epochs)
        .flat_map(|e| nn::train::batch_order(num_batches, seed, e, true))
        .take(steps)
        .filter(|&b| b < num_batches && !std::mem::replace(&mut seen[b], true))
        .collect()
}

/// A run stepped beside the training loop's own, on the same batches: a second first layer
/// (the encrypted one, or the float baseline) with its own copy of the model and optimizer.
/// The one training loop ([`nn::train::run`]) drives the simulation; a hook calls
/// [`Shadow::step`] after each of its steps, so both runs take the same steps.
pub struct Shadow<L> {
    /// The shadow's first layer.
    pub layer: L,
    /// The shadow's model.
    pub model: Model,
    /// The shadow's optimizer.
    pub opt: Optimizer,
}

impl<L: FirstLayer> Shadow<L> {
    /// A shadow starting from `initial` with the fresh optimizer `opt` (the run's own kind
    /// and rate, [`cryptonn::trainer::TrainConfig::optimizer`]).
    pub fn new(layer: L, initial: &Model, opt: Optimizer) -> Self {
        Shadow {
            layer,
            model: initial.clone(),
            opt,
        }
    }

    /// One step on `batch` of `epoch`, as the training loop's.
    pub fn step(&mut self, epoch: usize, batch: usize) -> Result<StepStats, TrainError> {
        self.opt.set_epoch(epoch);
        train_step(&mut self.model, &mut self.layer, &mut self.opt, batch)
    }
}

/// Integer products over an encrypted file that holds only some of the batches: batch `b` of
/// the training partition is batch `map[b]` of the file. Asking for a batch that was not
/// encrypted is an error.
pub struct Remap<P> {
    inner: P,
    map: Vec<Option<usize>>,
    batch_size: usize,
}

impl<P: IntegerProducts> Remap<P> {
    /// Products for a partition of `num_batches` batches of `batch_size`, where
    /// `encrypted[k]` is the partition's batch stored as batch `k` of the file.
    pub fn new(inner: P, num_batches: usize, batch_size: usize, encrypted: &[usize]) -> Self {
        let mut map = vec![None; num_batches];
        for (k, &b) in encrypted.iter().enumerate() {
            if let Some(slot) = map.get_mut(b) {
                *slot = Some(k);
            }
        }
        Remap {
            inner,
            map,
            batch_size,
        }
    }

    /// The wrapped products.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    fn file_batch(&self, batch: usize) -> Result<usize, SeamError> {
        match self.map.get(batch) {
            Some(Some(k)) => Ok(*k),
            Some(None) => Err(SeamError::backend(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("batch {batch} was not encrypted (only the FE budget's batches are)"),
            ))),
            None => Err(SeamError::NoSuchBatch {
                batch,
                num_batches: self.map.len(),
            }),
        }
    }
}

impl<P: IntegerProducts> IntegerProducts for Remap<P> {
    fn forward_int(
        &mut self,
        batch: usize,
        w_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let k = self.file_batch(batch)?;
        self.inner.forward_int(k, w_q)
    }
    fn backward_int(
        &mut self,
        batch: usize,
        delta_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let k = self.file_batch(batch)?;
        self.inner.backward_int(k, delta_q)
    }
    fn output_error_int(
        &mut self,
        batch: usize,
        a_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        let k = self.file_batch(batch)?;
        self.inner.output_error_int(k, a_q)
    }
    fn num_batches(&self) -> usize {
        self.map.len()
    }
    fn prefetch(&mut self, batch: usize) {
        if let Ok(k) = self.file_batch(batch) {
            self.inner.prefetch(k)
        }
    }
    fn batch_len(&self, batch: usize) -> usize {
        if batch < self.map.len() {
            self.batch_size
        } else {
            0
        }
    }
    fn input_bound(&self) -> u32 {
        self.inner.input_bound()
    }
    fn patches(&self) -> Option<&nn::layers::Geometry> {
        self.inner.patches()
    }
}

/// Wall seconds of the secure layer's parts (I/O, keys, decryptions).
pub fn secure_secs(t: &Timings) -> f64 {
    (t.io + t.keys + t.forward + t.backward + t.output_error).as_secs_f64()
}
