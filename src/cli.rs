//! What the role binaries share on their command lines: the data flags and how they load.
//!
//! `--data PATH` names an IDX directory (MNIST, Fashion-MNIST, KMNIST, EMNIST: any image
//! size), a CIFAR-10 binary directory or a `.csv` table; the format is detected (`--format`
//! overrides). Without `--data`, the embedded MNIST subset. Raw values become integers
//! `0..=X` through an [`Encoding`] fitted on the training data: read from `--encoding FILE`
//! when the file exists (so test and query data are encoded like the training data), else
//! fitted and written there. The encoding file also names a table's label column, so that
//! query data without it is read as inputs without labels ([`DataArgs::load_inputs`]).

use std::path::{Path, PathBuf};

use clap::Args;
use nn::data::{self, Dataset, DatasetInfo, EncodeReport, Encoding, Format, Inputs};
use nn::data::{LoadOptions, RawSet};

/// The data flags of every role.
#[derive(Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// The data: an IDX directory (MNIST-style file names, any image size), a CIFAR-10
    /// binary directory, or a .csv table with a header row. Default: the embedded MNIST
    /// subset (6,000 training and 1,000 test images). `client predict` also takes data
    /// without labels: a table without the label column that the --encoding file names (or
    /// --label-column), IDX images (a directory or one ...images-idx3-ubyte[.gz] file)
    /// without a label file.
    #[arg(long, value_name = "PATH", env = "CRYPTONN_MNIST_DIR")]
    pub data: Option<PathBuf>,
    /// The format of --data (idx, cifar10 or csv), when detection is not wanted.
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<Format>,
    /// The CSV column holding the labels (default: the one the --encoding file names, else
    /// the last column).
    #[arg(long, value_name = "NAME")]
    pub label_column: Option<String>,
    /// The encoding file (JSON): read if it exists (to encode test or query data like the
    /// training data), else fitted on the training data and written there.
    #[arg(long, value_name = "FILE")]
    pub encoding: Option<PathBuf>,
    /// Use only the first N samples: of the training data for `encrypt` and `simulate`, of
    /// the test or query data for `evaluate` and `predict`.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

/// Loaded and encoded data, its labels optional ([`Loaded`] has them).
#[derive(Debug, Clone)]
struct Parts {
    train: Inputs,
    test: Option<Inputs>,
    encoding: Encoding,
    clamped: EncodeReport,
    source: String,
}

/// Loaded and encoded data.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The training samples (after `--limit`).
    pub train: Dataset,
    /// The test samples, when the source has them.
    pub test: Option<Dataset>,
    /// The encoding used.
    pub encoding: Encoding,
    /// Values clamped while encoding (training and test together).
    pub clamped: EncodeReport,
    /// Where the data came from, for messages.
    pub source: String,
}

impl DataArgs {
    /// Reads the raw training and test parts.
    pub fn read_raw(&self) -> anyhow::Result<(RawSet, Option<RawSet>, String)> {
        self.read_with(&LoadOptions {
            label_column: self.label_column.clone(),
            allow_unlabelled: false,
        })
    }

    /// Reads the raw training and test parts with the loader options `opts`.
    fn read_with(&self, opts: &LoadOptions) -> anyhow::Result<(RawSet, Option<RawSet>, String)> {
        use anyhow::Context;
        Ok(match &self.data {
            None => {
                let (train, test) = data::mnist::embedded_raw()?;
                (train, Some(test), "embedded MNIST subset".to_string())
            }
            Some(p) => {
                let loader = data::raw::open(p, self.format, opts)
                    .with_context(|| format!("opening {}", p.display()))?;
                let (train, test) = loader
                    .read()
                    .with_context(|| format!("reading {} as {}", p.display(), loader.format()))?;
                (
                    train,
                    test,
                    format!("{} ({})", p.display(), loader.format()),
                )
            }
        })
    }

    /// Loads and encodes the data with bound `x_bound`: the encoding comes from
    /// `--encoding` when that file exists, else it is fitted on the training part and
    /// written to `--encoding` (or to `default_encoding` when given). Data that does not fit
    /// `expected` (an authority's parameters) is refused before anything is fitted or
    /// written.
    pub fn load(
        &self,
        x_bound: u32,
        default_encoding: Option<&Path>,
        expected: Option<&DatasetInfo>,
    ) -> anyhow::Result<Loaded> {
        use anyhow::Context;
        let p = self.load_parts(x_bound, default_encoding, expected, None)?;
        let test = match p.test {
            Some(t) => Some(t.into_dataset().context("the test data")?),
            None => None,
        };
        Ok(Loaded {
            train: p.train.into_dataset().context("the training data")?,
            test,
            encoding: p.encoding,
            clamped: p.clamped,
            source: p.source,
        })
    }

    /// [`DataArgs::load`], labels optional when `model` is given: data without labels is
    /// read too and takes the classes of `model`.
    fn load_parts(
        &self,
        x_bound: u32,
        default_encoding: Option<&Path>,
        expected: Option<&DatasetInfo>,
        model: Option<&DatasetInfo>,
    ) -> anyhow::Result<Parts> {
        use anyhow::Context;
        let path = self.encoding.as_deref().or(default_encoding);
        let existing = match path {
            Some(p) if p.exists() => {
                let e = Encoding::load(p)?;
                if e.x_bound != x_bound {
                    anyhow::bail!(
                        "{} encodes values into 0..={}, but 0..={x_bound} is needed here \
                         (the authority's bound); fit a new encoding",
                        p.display(),
                        e.x_bound
                    );
                }
                Some(e)
            }
            _ => None,
        };
        let opts = LoadOptions {
            label_column: self
                .label_column
                .clone()
                .or_else(|| existing.as_ref().and_then(|e| e.label_column.clone())),
            allow_unlabelled: model.is_some(),
        };
        let (mut train, mut test, source) = self.read_with(&opts)?;
        if let Some(m) = model {
            let names: Vec<String> = (0..m.classes)
                .map(|k| m.class_name(k).into_owned())
                .collect();
            for part in std::iter::once(&mut train).chain(test.as_mut()) {
                if !part.is_labelled() {
                    part.align_classes(&names)?;
                }
            }
        }
        let train = match self.limit {
            Some(n) => train.take(n),
            None => train,
        };
        if let Some(e) = expected {
            let info = train.info(x_bound)?;
            info.check_fits(e).map_err(|err| {
                anyhow::anyhow!("{err} (the data: {info}; the authority's parameters: {e})")
            })?;
        }
        let encoding = match existing {
            Some(e) => e,
            None => {
                let mut fit_on = train.clone();
                if let Some(t) = &test {
                    // Every class of either part gets a fixed index.
                    let names = data::raw::union_classes(&train.class_names, &t.class_names);
                    fit_on.align_classes(&names)?;
                }
                let e = Encoding::fit(&fit_on, x_bound).context("fitting the encoding")?;
                if let Some(p) = path {
                    e.save(p)?;
                }
                e
            }
        };
        let (train, mut report) = encoding
            .encode(&train)
            .context("encoding the training data")?;
        let test = match test {
            Some(t) => {
                let (d, r) = encoding.encode(&t).context("encoding the test data")?;
                report.clamped += r.clamped;
                if report.worst_column.is_none() {
                    report.worst_column = r.worst_column;
                }
                Some(d)
            }
            None => None,
        };
        Ok(Parts {
            train,
            test,
            encoding,
            clamped: report,
            source,
        })
    }
}

impl DataArgs {
    /// The plaintext evaluation or query set: the test part of the data (an IDX or CIFAR-10
    /// directory), or all of it when it has none (a CSV table), at most `--limit` samples,
    /// encoded with the bound of `info` and checked against it. Values that need an encoding
    /// are refused without `--encoding`, so that the set is encoded like the training data.
    /// The data must have labels.
    pub fn load_eval(&self, info: &DatasetInfo) -> anyhow::Result<Dataset> {
        use anyhow::Context;
        self.eval_parts(info, false)?
            .into_dataset()
            .context("the evaluation data")
    }

    /// The inputs to predict with a model described by `info`: as [`DataArgs::load_eval`],
    /// labels optional. A table without its label column (named by `--label-column`, else by
    /// the `--encoding` file) and IDX images without a label file are inputs without labels,
    /// their classes those of `info`.
    pub fn load_inputs(&self, info: &DatasetInfo) -> anyhow::Result<Inputs> {
        self.eval_parts(info, true)
    }

    /// The evaluation set of [`DataArgs::load_eval`], labels optional if `allow_unlabelled`.
    fn eval_parts(&self, info: &DatasetInfo, allow_unlabelled: bool) -> anyhow::Result<Inputs> {
        use anyhow::Context;
        let model = allow_unlabelled.then_some(info);
        let loaded = self.load_parts(info.x_bound, None, None, model)?;
        if self.encoding.is_none()
            && loaded
                .encoding
                .columns
                .iter()
                .any(|c| *c != data::encoding::ColumnMap::Keep)
        {
            anyhow::bail!(
                "{} has values that need an encoding: give the client's encoding file with \
                 --encoding (or --eval-encoding), so that the data is encoded like the \
                 training data",
                loaded.source
            );
        }
        warn_clamped(&loaded.clamped);
        let mut set = loaded.test.unwrap_or(loaded.train);
        if let Some(n) = self.limit {
            set = set.take(n);
        }
        set.info
            .check_fits(info)
            .with_context(|| format!("the data {} does not fit the model's", loaded.source))?;
        Ok(set)
    }
}

/// The connection settings of every role that serves (`authority serve`, `trainer serve`).
#[derive(Args, Debug, Clone)]
pub struct NetArgs {
    /// Close connections idle for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub idle_timeout: u64,
    /// Most authenticated connections served at once; more are told to try again later.
    #[arg(long, value_name = "N", default_value_t = crate::net::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// A new connection must send its token within this many seconds or is closed.
    #[arg(long, value_name = "SECS", default_value_t = crate::net::DEFAULT_AUTH_TIMEOUT.as_secs_f64())]
    pub auth_timeout: f64,
    /// Most connections waiting to authenticate; a newer one closes the oldest.
    #[arg(long, value_name = "N", default_value_t = crate::net::DEFAULT_MAX_PENDING)]
    pub max_pending: usize,
    /// Most connections from one IP address; a newer one closes that address's oldest
    /// connection waiting to authenticate, or is told to try again later.
    #[arg(long, value_name = "N", default_value_t = crate::net::DEFAULT_MAX_PER_PEER)]
    pub max_per_peer: usize,
    /// Authenticated requests a second from one IP address, on average; more (beyond the
    /// burst) are told to try again later [default: 50 for the authority, whose callers ask
    /// a few times a step; 1000 for the prediction service, where one client sends a query
    /// per input].
    #[arg(long, value_name = "PER_SEC")]
    pub peer_rate: Option<f64>,
    /// Authenticated requests from one IP address at once, before --peer-rate applies
    /// [default: twice the rate].
    #[arg(long, value_name = "N")]
    pub peer_burst: Option<u32>,
    /// Most request bytes being read or answered at once (at least the frame limit); a
    /// request that finds no room for 2 s is told to try again later.
    #[arg(long, value_name = "BYTES", default_value_t = crate::net::DEFAULT_MAX_INFLIGHT_BYTES)]
    pub max_inflight_bytes: usize,
}

impl NetArgs {
    /// The network settings with `token` and `frame_limit` (the largest request frame, which
    /// must fit `--max-inflight-bytes`), checked; `peer_rate` is the role's default of
    /// `--peer-rate`.
    pub fn settings(
        &self,
        token: String,
        frame_limit: usize,
        peer_rate: f64,
    ) -> anyhow::Result<crate::net::Settings> {
        use anyhow::Context;
        if self.idle_timeout == 0 {
            anyhow::bail!("--idle-timeout must be at least 1 second");
        }
        let settings = crate::net::Settings {
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout),
            max_connections: self.max_connections,
            max_pending: self.max_pending,
            max_per_peer: self.max_per_peer,
            peer_rate: self.peer_rate.unwrap_or(peer_rate),
            peer_burst: self.peer_burst.unwrap_or_else(|| {
                // Twice the rate, at least 1 (the cast saturates).
                (2.0 * self.peer_rate.unwrap_or(peer_rate)).ceil().max(1.0) as u32
            }),
            max_inflight_bytes: self.max_inflight_bytes,
            frame_limit,
            auth_timeout: std::time::Duration::try_from_secs_f64(self.auth_timeout)
                .ok()
                .filter(|d| !d.is_zero())
                .context("--auth-timeout must be a positive number of seconds")?,
            ..crate::net::Settings::new(token)
        };
        settings.validate()?;
        Ok(settings)
    }
}

/// Prints a warning on standard error when values were clamped while encoding.
pub fn warn_clamped(r: &EncodeReport) {
    if r.clamped > 0 {
        let worst = r
            .worst_column
            .as_ref()
            .map(|(c, n)| format!(" (most in column {c:?}: {n})"))
            .unwrap_or_default();
        eprintln!(
            "warning: {} values were outside the encoding's fitted range and were clamped{worst}",
            r.clamped
        );
    }
}

/// The experimenter's plaintext evaluation set of `trainer train` and `trainer simulate`.
#[derive(Args, Debug, Clone, Default)]
pub struct EvalArgs {
    /// Also score each epoch on a plaintext test set: "embedded" for the embedded MNIST test
    /// images, or a path as for --data (its test part; a CSV table whole), encoded with
    /// --eval-encoding. The training data stays as it is (encrypted, for `train`).
    #[arg(long, value_name = "PATH")]
    pub eval_data: Option<String>,
    /// The client's encoding file, to encode --eval-data like the training data.
    #[arg(long, value_name = "FILE")]
    pub eval_encoding: Option<PathBuf>,
    /// The CSV label column of --eval-data.
    #[arg(long, value_name = "NAME")]
    pub eval_label_column: Option<String>,
}

impl EvalArgs {
    /// The data flags of the evaluation set, if one was asked for.
    pub fn data_args(&self) -> Option<DataArgs> {
        self.eval_data.as_ref().map(|p| DataArgs {
            data: (p != "embedded").then(|| PathBuf::from(p)),
            label_column: self.eval_label_column.clone(),
            encoding: self.eval_encoding.clone(),
            ..DataArgs::default()
        })
    }
}

/// How a role reaches the authority: its address, the bearer token and the transport. The
/// same flags in every binary that calls it.
#[derive(Args, Debug, Clone)]
pub struct AuthorityArgs {
    /// Authority address.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub authority: String,
    /// Bearer token for the authority (or the file named by --token-file).
    #[arg(long, env = "CRYPTONN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// How to reach it: TLS pinned to --ca, or clear text with --insecure-plaintext.
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl AuthorityArgs {
    /// The token from `--token` (or `CRYPTONN_TOKEN`), else from `--token-file`.
    pub fn token(&self) -> anyhow::Result<String> {
        Ok(crate::protocol::resolve_token(
            self.token.clone(),
            self.token_file.as_deref(),
        )?)
    }

    /// The client configuration for the authority: default timeouts, TLS as
    /// [`TlsArgs::authority`] says.
    pub fn client_config(&self) -> anyhow::Result<crate::protocol::ClientConfig> {
        Ok(crate::protocol::ClientConfig {
            transport: self.tls.authority(self.token_file.as_deref())?,
            ..crate::protocol::ClientConfig::default()
        })
    }

    /// Connects to the authority.
    pub fn connect(&self) -> anyhow::Result<crate::protocol::AuthorityClient> {
        use anyhow::Context;
        crate::protocol::AuthorityClient::connect_with(
            &self.authority,
            &self.token()?,
            self.client_config()?,
        )
        .with_context(|| format!("connecting to the authority at {}", self.authority))
    }
}

/// How a caller reaches the authority: TLS pinned to its certificate (the default), or clear
/// text when told so.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// The authority's TLS certificate (the cert.pem that `authority init` wrote): the only
    /// certificate trusted, compared byte for byte. Default: cert.pem beside --token-file.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Trust the authority's certificate by its SHA-256 fingerprint instead of a copy of the
    /// file (the 64 hexadecimal digits `authority init` prints).
    #[arg(long, value_name = "HEX", conflicts_with = "ca")]
    pub ca_fingerprint: Option<String>,
    /// Speak clear-text TCP instead of TLS: tokens, keys and data travel unprotected. For
    /// tests and benchmarks only; the server must be started with --insecure-plaintext too.
    #[arg(long)]
    pub insecure_plaintext: bool,
}

impl TlsArgs {
    /// The transport to the authority: TLS pinned to `--ca`, or to the `cert.pem` beside
    /// `token_file`, or clear text with `--insecure-plaintext`.
    pub fn authority(
        &self,
        token_file: Option<&Path>,
    ) -> anyhow::Result<crate::protocol::ClientTransport> {
        let beside = token_file.map(|t| sibling(t, crate::tls::CERT_FILE));
        client_transport(
            Pin {
                file: self.ca.as_deref(),
                fingerprint: self.ca_fingerprint.as_deref(),
                default_file: beside.as_deref(),
            },
            self.insecure_plaintext,
            "the authority",
            "--ca",
        )
    }
}

/// `name` in the directory of `file`.
pub fn sibling(file: &Path, name: &str) -> PathBuf {
    match file.parent() {
        Some(d) => d.join(name),
        None => PathBuf::from(name),
    }
}

/// What a caller trusts a server's certificate by: a copy of the file, its fingerprint, or
/// the file at a default place.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pin<'a> {
    /// The certificate file given (`--ca`, `--server-ca`).
    pub file: Option<&'a Path>,
    /// Its SHA-256 fingerprint given instead (`--ca-fingerprint`, `--server-ca-fingerprint`).
    pub fingerprint: Option<&'a str>,
    /// Where the file is looked for when neither is given.
    pub default_file: Option<&'a Path>,
}

/// The transport to a server: clear text when `plaintext`, else TLS pinned as `pin` says.
/// `who` and `flag` name the server and the flag in the error when there is nothing to pin.
pub fn client_transport(
    pin: Pin<'_>,
    plaintext: bool,
    who: &str,
    flag: &str,
) -> anyhow::Result<crate::protocol::ClientTransport> {
    use anyhow::Context;
    let (cert, default_cert) = (pin.file, pin.default_file);
    if plaintext {
        if cert.is_some() || pin.fingerprint.is_some() {
            anyhow::bail!("{flag} and --insecure-plaintext contradict each other");
        }
        return Ok(crate::protocol::ClientTransport::Plaintext);
    }
    if let Some(hex) = pin.fingerprint {
        let config = crate::tls::pinned_client_fingerprint(hex)
            .with_context(|| format!("the certificate fingerprint of {who}"))?;
        return Ok(crate::protocol::ClientTransport::Tls(config));
    }
    let path = match (cert, default_cert) {
        (Some(c), _) => c,
        (None, Some(d)) if d.exists() => d,
        _ => anyhow::bail!(
            "no TLS certificate to trust for {who}: give its certificate with {flag} FILE or \
             its fingerprint with {flag}-fingerprint HEX{} (or --insecure-plaintext on both \
             sides, for tests)",
            default_cert
                .map(|d| format!(" (looked for {})", d.display()))
                .unwrap_or_default()
        ),
    };
    crate::protocol::ClientTransport::pinned(path)
        .with_context(|| format!("the TLS certificate of {who}"))
}

/// The TLS configuration of a server from its certificate and key files, or clear text.
pub fn server_transport(
    cert: &Path,
    key: &Path,
    plaintext: bool,
) -> anyhow::Result<crate::net::Transport> {
    use anyhow::Context;
    if plaintext {
        return Ok(crate::net::Transport::Plaintext);
    }
    let config = crate::tls::server_config(cert, key)
        .with_context(|| format!("loading the TLS certificate {}", cert.display()))?;
    Ok(crate::net::Transport::Tls(config))
}
