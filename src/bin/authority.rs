//! `authority`: the CryptoNN key authority.
//!
//! `authority init` generates the master keys into a directory; `authority serve` answers key
//! requests from clients and trainers over TCP; `authority audit` checks and summarises the
//! audit log. Run `authority --help` for details.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use cryptonn::authority::{self, InitOptions, Policy, ServerConfig};
use cryptonn::cli::NetArgs;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The CryptoNN key authority: holds the master secret keys and derives function keys for
/// authenticated callers under a key policy, logging every key it issues.
#[derive(Parser, Debug)]
#[command(
    name = "authority",
    version,
    after_help = "Example:\n  authority init --dir keys --batch-size 64   (MNIST's shape: 784 features, 10 classes, values 0..=255)\n  \
                  authority init --dir keys --features 30 --classes 2 --x-bound 255   (a table)\n  \
                  authority serve --dir keys --listen 127.0.0.1:7700\n\n\
                  Callers (client, trainer) authenticate with the token in keys/token \
                  (or CRYPTONN_TOKEN) and connect over TLS, trusting the certificate \
                  keys/cert.pem (found beside --token-file, or given with --ca). Clear-text \
                  TCP needs --insecure-plaintext on both sides (tests and benchmarks only)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate master keys, public parameters and a caller token into a directory.
    ///
    /// Writes row.msk, col.msk, febo.msk, token and cert.key with mode 0600, params.bin and
    /// cert.pem (a self-signed TLS certificate for localhost, 127.0.0.1 and any --san names,
    /// which callers pin). Refuses to overwrite existing keys unless --force is given.
    Init(InitArgs),
    /// Serve key requests over TCP until SIGTERM or SIGINT (Ctrl-C).
    ///
    /// Prints `listening on ADDR` on stdout once ready (with the real port when --listen
    /// asks for port 0). Every key request is checked against the key policy and logged
    /// to the audit file; failures before authentication are summarised there per peer
    /// address. On SIGTERM or SIGINT, closes the connections, writes the pending summaries
    /// and a stop line to the audit log, and exits with status 0.
    Serve(Box<ServeArgs>),
    /// Print the effective key policy as JSON (the defaults, or those of --policy and the
    /// override flags), a starting point for a policy file.
    Policy(PolicyArgs),
    /// Check the audit log's hash chain and summarise it.
    ///
    /// Reads DIR/audit.log (or --audit), its rotated files audit.log.1, .2, ... and its head
    /// file; prints the keys issued by kind and by caller, the refusals, the errors and the
    /// failures before authentication, and whether the chain is intact, naming the first
    /// broken line. Exits with status 1 when the chain is broken.
    Audit(AuditArgs),
}

#[derive(Args, Debug)]
struct AuditArgs {
    /// Directory written by `authority init`.
    #[arg(long, required_unless_present = "audit")]
    dir: Option<PathBuf>,
    /// The audit log [default: DIR/audit.log].
    #[arg(long, value_name = "FILE")]
    audit: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct InitArgs {
    /// Directory for the keys (created with mode 0700 if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Number of samples per batch: the length of the column vectors the client encrypts.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Features per sample n (pixels of an image, columns of a table besides the label): the
    /// row keys have length n + 1. Default: MNIST's 784.
    #[arg(long, value_name = "N", default_value_t = nn::mnist::FEATURES)]
    features: usize,
    /// Number of classes C (2 to 256). Default: MNIST's 10.
    #[arg(long, value_name = "C", default_value_t = nn::mnist::CLASSES)]
    classes: usize,
    /// Bound X on the encoded values: clients encode every feature into 0..=X (1 to 65535).
    /// Default: 255, a byte.
    #[arg(long, value_name = "X", default_value_t = nn::mnist::X_BOUND)]
    x_bound: u32,
    /// Token callers must present (default: 32 random bytes in hex, written to DIR/token).
    #[arg(long, env = "CRYPTONN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Overwrite existing keys (datasets encrypted under the old keys become useless).
    #[arg(long)]
    force: bool,
    /// Another name (host name or IP address) of the TLS certificate, besides localhost and
    /// 127.0.0.1; repeat for more. Callers pin the certificate, so names matter only to
    /// tools that check them.
    #[arg(long, value_name = "NAME")]
    san: Vec<String>,
}

#[derive(Args, Debug)]
struct PolicyArgs {
    /// JSON policy file; fields left out take their defaults.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Fewest non-zero entries of a row key vector [default: min(16, ceil((n + 1) / 2))].
    #[arg(long, value_name = "N")]
    min_nonzero_row: Option<usize>,
    /// Fewest non-zero entries of a column key vector [default: 2].
    #[arg(long, value_name = "N")]
    min_nonzero_col: Option<usize>,
    /// Largest |entry| of an inner-product key vector [default: 32767].
    #[arg(long, value_name = "N")]
    max_abs: Option<u32>,
    /// Serve one column key for every batch instead of one per batch (the default binds
    /// column keys to batches: each batch's columns are encrypted under its own key, and a
    /// column key decrypts its own batch only). With a shared key, a key asked for one batch
    /// decrypts the same combination of every batch: the first step's keys decrypt every
    /// image. Only for data encrypted that way (before binding existed, or on purpose).
    #[arg(long, conflicts_with = "batch_rank_budget")]
    shared_column_key: bool,
    /// The most rank the column keys of one batch may reach; a request
    /// past it is refused, and R must be below the batch size: then every batch keeps a
    /// space of dimension (batch size - R) that no sequence of backward steps determines.
    /// The trainer stays within it by itself (it zeroes the delta lanes past it), but cannot
    /// resume a run from a checkpoint under it. The count is kept in DIR/ranks.log (locked
    /// while serving), so a restart keeps it.
    #[arg(long, value_name = "R")]
    batch_rank_budget: Option<usize>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Directory written by `authority init`.
    #[arg(long)]
    dir: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: String,
    /// Token callers must present (default: the content of DIR/token).
    #[arg(long, env = "CRYPTONN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    net: NetArgs,
    /// Audit log, appended to [default: DIR/audit.log].
    #[arg(long, value_name = "FILE")]
    audit: Option<PathBuf>,
    /// Rotate the audit log when it would exceed this size (at least 4096).
    #[arg(long, value_name = "BYTES", default_value_t = authority::audit::DEFAULT_MAX_BYTES)]
    audit_max_bytes: u64,
    /// Rotated audit files to keep (audit.log.1 to audit.log.N; older ones are deleted).
    #[arg(long, value_name = "N", default_value_t = authority::audit::DEFAULT_MAX_FILES)]
    audit_max_files: usize,
    /// Summarise failures before authentication (bad tokens, garbage frames, timeouts) in
    /// the audit log every this many seconds, one line per peer address.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    failure_summary_secs: u64,
    /// ... or as soon as one peer address has this many.
    #[arg(long, value_name = "N", default_value_t = authority::audit::DEFAULT_SUMMARY_EVERY)]
    failure_summary_every: u64,
    /// Largest accepted request frame in bytes (at most 64 MiB).
    #[arg(long, value_name = "BYTES", default_value_t = cryptonn::protocol::MAX_FRAME)]
    max_frame: usize,
    /// Do not print a line per request on stderr.
    #[arg(long)]
    quiet: bool,
    /// The TLS certificate [default: DIR/cert.pem].
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// The TLS certificate's private key, refused if group or others can read it
    /// [default: DIR/cert.key].
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Serve clear-text TCP instead of TLS: tokens and keys travel unprotected. For tests
    /// and benchmarks only; callers must be given --insecure-plaintext too.
    #[arg(long, conflicts_with_all = ["cert", "key"])]
    insecure_plaintext: bool,
}

fn policy_of(args: &PolicyArgs) -> Result<Policy> {
    let mut p = match &args.policy {
        Some(path) => Policy::from_file(path).map_err(anyhow::Error::msg)?,
        None => Policy::default(),
    };
    if let Some(n) = args.min_nonzero_row {
        p.min_nonzero_row = Some(n);
    }
    if let Some(n) = args.min_nonzero_col {
        p.min_nonzero_col = n;
    }
    if let Some(n) = args.max_abs {
        p.max_abs = n;
    }
    if args.shared_column_key {
        p.bind_batches = false;
    }
    if let Some(r) = args.batch_rank_budget {
        p.batch_rank_budget = Some(r);
    }
    Ok(p)
}

fn init(args: &InitArgs) -> Result<()> {
    let dataset = nn::data::DatasetInfo::new(args.features, args.x_bound, args.classes)
        .context("invalid --features, --classes or --x-bound")?;
    let made = authority::init(
        &args.dir,
        dataset,
        args.batch_size,
        &InitOptions {
            token: args.token.clone(),
            force: args.force,
            names: args.san.clone(),
        },
    )?;
    let fp: String = made
        .params
        .fingerprint()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!(
        "authority keys written to {} (data: {}; batch size {}; parameters fingerprint {fp})",
        args.dir.display(),
        made.params.dataset,
        args.batch_size
    );
    println!(
        "callers authenticate with the token in {} and trust the TLS certificate {} \
         (SHA-256 fingerprint {})",
        args.dir.join(authority::TOKEN_FILE).display(),
        args.dir.join(cryptonn::tls::CERT_FILE).display(),
        made.cert_fingerprint
    );
    Ok(())
}

fn serve(args: &ServeArgs) -> Result<()> {
    let auth = authority::load(&args.dir)
        .with_context(|| format!("cannot load the keys in {}", args.dir.display()))?;
    let token = match &args.token {
        Some(t) => t.clone(),
        None => authority::read_token(&args.dir)?,
    };
    let mut config = ServerConfig::new(
        token,
        args.audit
            .clone()
            .unwrap_or_else(|| args.dir.join(authority::AUDIT_FILE)),
    );
    config.policy = policy_of(&args.policy)?;
    // The rank budget's count belongs to the keys, wherever the audit log goes.
    config.ranks = args.dir.join(authority::RANKS_FILE);
    if args.failure_summary_secs == 0 {
        bail!("--failure-summary-secs must be at least 1");
    }
    config.audit_limits = authority::AuditLimits {
        max_bytes: args.audit_max_bytes,
        max_files: args.audit_max_files,
        summary_interval: Duration::from_secs(args.failure_summary_secs),
        summary_every: args.failure_summary_every,
    };
    config.net = cryptonn::net::Settings {
        verbose: !args.quiet,
        ..args.net.settings(
            config.net.token.clone(),
            args.max_frame,
            cryptonn::net::DEFAULT_PEER_RATE,
        )?
    };
    config.net.transport = cryptonn::cli::server_transport(
        &args
            .cert
            .clone()
            .unwrap_or_else(|| args.dir.join(cryptonn::tls::CERT_FILE)),
        &args
            .key
            .clone()
            .unwrap_or_else(|| args.dir.join(cryptonn::tls::KEY_FILE)),
        args.insecure_plaintext,
    )?;
    if args.insecure_plaintext {
        eprintln!("authority: WARNING: serving clear-text TCP (--insecure-plaintext)");
    }
    let listener = TcpListener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let batch = auth.batch_size();
    eprintln!(
        "authority: data {}, batch size {batch}, audit log {}",
        auth.params().dataset,
        config.audit.display()
    );
    // spawn() validates the configuration and opens the audit log before accepting.
    let server = authority::spawn(listener, auth, config)?;
    // SIGTERM and SIGINT shut down cleanly: open connections are closed and the audit log
    // gets its failure summaries and a stop line.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .context("cannot install the signal handlers")?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {addr}")?;
    out.flush()?;
    drop(out);
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("authority: shutting down");
    server.shutdown()?;
    Ok(())
}

fn print_policy(args: &PolicyArgs) -> Result<()> {
    println!("{}", policy_of(args)?.to_json());
    Ok(())
}

/// Prints the report; `Ok(false)` when the chain is broken.
fn audit(args: &AuditArgs) -> Result<bool> {
    let path = match (&args.audit, &args.dir) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => d.join(authority::AUDIT_FILE),
        (None, None) => bail!("give --dir or --audit"),
    };
    let report = authority::audit::verify(&path)
        .with_context(|| format!("cannot read the audit log {}", path.display()))?;
    if report.files.is_empty() && report.intact() {
        bail!("no audit log at {}", path.display());
    }
    println!("audit log {}", path.display());
    println!("{report}");
    Ok(report.intact())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Init(a) => init(a),
        Command::Serve(a) => serve(a),
        Command::Policy(a) => print_policy(a),
        Command::Audit(a) => match audit(a) {
            Ok(true) => Ok(()),
            Ok(false) => {
                eprintln!("authority: the audit log's chain is broken");
                return std::process::ExitCode::FAILURE;
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("authority: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
