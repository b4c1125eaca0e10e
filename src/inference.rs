//! Secure inference: the model owner's prediction service and the client's encrypted queries.
//!
//! # The service
//!
//! [`PredictionService::start`] quantizes the model's first layer once
//! ([`nn::infer::QuantizedModel`]), asks the authority in one request for the inference keys
//! of its `H` rows `w_j` ([`Request::InferenceKeys`](crate::protocol::Request)), keeps them in
//! memory only, and prepares them for decryption ([`fe::feip::FeipDecryptor`]). A query is
//! one row ciphertext of `x = (features, X)` under the authority's row key (no columns, no
//! labels, no batch size). The service decrypts `z_j = <w_j, x>` for every row, runs the
//! other layers in the clear and answers the class and the probabilities.
//!
//! A convolutional first layer is served the same way with one key per kernel and position
//! (the kernels placed on the input, [`nn::infer`]): the service sends the kernels and their
//! window ([`ConvKeyRequest`](crate::protocol::ConvKeyRequest)), the authority places and
//! checks them itself and returns one key per placed kernel.
//!
//! Concurrent queries are batched: connection threads hand their ciphertexts to one batcher,
//! which waits at most [`ServiceOptions::batch_wait`] after the first query for the other
//! queries already arriving (up to [`ServiceOptions::max_batch`]; a lone query does not wait)
//! and decrypts them together on all cores (one
//! ciphertext per core instead of one ciphertext's keys split across the cores, so each
//! ciphertext's subset-sum tables are built once). Every query gets its own result: one that
//! does not decode, has the wrong length, or was encrypted under other parameters fails
//! alone, with a clear error to its client, and is not counted as a prediction.
//!
//! # What each party learns
//!
//! The service learns `z = W1 x` of every query (as the trainer does in training); the
//! client learns the class and the probabilities; the authority sees `W1` once, when the
//! service starts. See the README's threat model.
//!
//! # The client
//!
//! [`encrypt_queries`] encrypts inputs (labelled or not) as queries (fixed-base tables, all
//! cores), [`run_queries`] sends them with `K` in flight and records each answer's latency.

use crate::net::{self, lock, Failure, Service, Settings};
use crate::protocol::{AuthorityClient, Client, ClientConfig, ProtocolError, PublicParams, Reply};
use crate::Curve;
use fe::dlog::DlogTable;
use fe::feip::{FeipCiphertext, FeipDecryptor, FeipEncryptor};
use fe::Encode;
use nn::data::{DatasetInfo, Inputs};
use nn::infer::{Prediction, QuantizedModel};
use nn::model::Model;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Errors of the prediction service and its clients.
#[derive(Debug, Error)]
pub enum InferenceError {
    /// The model cannot be served.
    #[error(transparent)]
    Model(#[from] nn::infer::InferError),
    /// The model does not fit the authority's parameters.
    #[error("the model does not fit the authority's parameters: {0}")]
    Mismatch(String),
    /// Talking to the authority or the service failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A scheme operation failed.
    #[error(transparent)]
    Fe(#[from] fe::FeError),
    /// The network layer refused its settings.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Setting(String),
}

/// What a caller asks the prediction service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PredictRequest {
    /// What the service serves ([`ServiceInfo`]).
    Info,
    /// One encrypted query.
    Predict {
        /// The fingerprint of the public parameters the query was encrypted under.
        params: [u8; 32],
        /// The encoding of the query's row ciphertext ([`FeipCiphertext`]).
        #[serde(with = "serde_bytes")]
        query: Vec<u8>,
    },
}

/// What the service tells its clients about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// The data the model takes (features, bound, classes and their names).
    pub dataset: DatasetInfo,
    /// The fingerprint of the authority's public parameters the service holds keys under.
    pub params: [u8; 32],
    /// The model's layout, such as `784-128-32-10/sigmoid`.
    pub model: String,
    /// Bits of the quantized first-layer rows.
    pub bits: u32,
}

/// What the service answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PredictResponse {
    /// The service's description.
    Info(Box<ServiceInfo>),
    /// The prediction for one query.
    Prediction(Prediction),
    /// The request was understood and refused (authentication).
    Refused(String),
    /// The request could not be answered (a query that does not decode or decrypt).
    Error(String),
    /// Every connection slot is taken; try again later.
    Busy(String),
}

impl Reply for PredictResponse {
    const ROLE: &'static str = "prediction service";
    fn check(self) -> Result<Self, ProtocolError> {
        let role = Self::ROLE;
        match self {
            PredictResponse::Refused(message) => Err(ProtocolError::Refused { role, message }),
            PredictResponse::Error(message) => Err(ProtocolError::Server { role, message }),
            PredictResponse::Busy(message) => Err(ProtocolError::Busy { role, message }),
            r => Ok(r),
        }
    }
}

/// A connection to a prediction service.
pub type PredictionClient = Client<PredictRequest, PredictResponse>;

impl PredictionClient {
    /// The service's description.
    pub fn info(&mut self) -> Result<ServiceInfo, ProtocolError> {
        match self.call(PredictRequest::Info)? {
            PredictResponse::Info(i) => Ok(*i),
            other => Err(ProtocolError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The prediction for one encrypted query.
    pub fn predict(
        &mut self,
        params: [u8; 32],
        query: Vec<u8>,
    ) -> Result<Prediction, ProtocolError> {
        match self.call(PredictRequest::Predict { params, query })? {
            PredictResponse::Prediction(p) => Ok(p),
            other => Err(ProtocolError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// Default largest batch of queries decrypted together.
pub const DEFAULT_MAX_BATCH: usize = 16;
/// Default `--peer-rate` of the prediction service: one client sends a query per input, so
/// the authority's 50 a second would throttle a single client below what 2 cores serve.
pub const DEFAULT_PEER_RATE: f64 = 1000.0;
/// Default longest wait for a batch to fill after its first query.
pub const DEFAULT_BATCH_WAIT: Duration = Duration::from_millis(2);

/// How the service batches and admits queries.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Bits of the quantized first-layer rows (the training's `--bits`; default 8).
    pub bits: u32,
    /// Largest batch of queries decrypted together (default [`DEFAULT_MAX_BATCH`]).
    pub max_batch: usize,
    /// Longest wait for a batch to fill after its first query (default
    /// [`DEFAULT_BATCH_WAIT`]).
    pub batch_wait: Duration,
    /// Print one line per batch on stderr.
    pub verbose: bool,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            bits: 8,
            max_batch: DEFAULT_MAX_BATCH,
            batch_wait: DEFAULT_BATCH_WAIT,
            verbose: false,
        }
    }
}

/// A query waiting for its batch, and where its answer goes.
struct Job {
    ct: FeipCiphertext<Curve>,
    reply: mpsc::SyncSender<Result<Prediction, String>>,
}

/// The queue between the connection threads and the batch worker.
struct Batcher {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
    stop: AtomicBool,
}

/// Counters of the service, read by [`PredictionService::stats`].
#[derive(Debug, Default)]
struct Counters {
    /// Queries that have arrived and are not yet in a batch: how many a batch may still
    /// expect.
    inflight: AtomicUsize,
    predictions: AtomicU64,
    failed: AtomicU64,
    batches: AtomicU64,
}

/// What the service has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceStats {
    /// Queries answered with a prediction.
    pub predictions: u64,
    /// Queries answered with an error (not predictions).
    pub failed: u64,
    /// Batches decrypted.
    pub batches: u64,
}

/// The model, its prepared keys and the batch worker's state.
struct Core {
    model: QuantizedModel,
    decryptor: FeipDecryptor<Curve>,
    dlog: Arc<DlogTable<Curve>>,
    info: ServiceInfo,
    row_len: usize,
    batcher: Batcher,
    counters: Counters,
    options: ServiceOptions,
}

/// The prediction service: a [`Service`] of the network layer (see the module docs).
#[derive(Clone)]
pub struct PredictionService {
    core: Arc<Core>,
}

impl PredictionService {
    /// Quantizes `model`'s first layer, asks `authority` once for the keys of its rows and
    /// starts the batch worker. `dlog` must cover the first layer's products.
    pub fn start(
        model: Model,
        authority: &mut AuthorityClient,
        dlog: Arc<DlogTable<Curve>>,
        options: ServiceOptions,
    ) -> Result<Self, InferenceError> {
        if options.max_batch == 0 {
            return Err(InferenceError::Setting(
                "max_batch must be at least 1".into(),
            ));
        }
        let params = authority.params()?;
        let model = QuantizedModel::new(model, options.bits)?;
        check_model_fits(&model, &params)?;
        dlog.check_bound(u128::from(model.forward_bound()))?;
        let rows: Vec<Vec<i64>> = model
            .rows()
            .rows()
            .into_iter()
            .map(|r| r.to_vec())
            .collect();
        let keys = match model.kernels() {
            None => authority.inference_keys(&rows)?,
            Some((g, kernels)) => authority
                .conv_inference_keys(crate::protocol::ConvKeyRequest::new(g, kernels)?, &rows)?,
        };
        let decryptor = FeipDecryptor::new(&params.row.params(), &keys, &dlog)?;
        drop(keys);
        let info = ServiceInfo {
            dataset: model.info().clone(),
            params: params.fingerprint(),
            model: model.model().spec().to_string(),
            bits: model.bits(),
        };
        let core = Arc::new(Core {
            row_len: params.dataset.row_len(),
            model,
            decryptor,
            dlog,
            info,
            batcher: Batcher {
                queue: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
                stop: AtomicBool::new(false),
            },
            counters: Counters::default(),
            options,
        });
        let worker = core.clone();
        std::thread::Builder::new()
            .name("predict-batches".into())
            .spawn(move || worker.run_batches())
            .map_err(|e| InferenceError::Setting(format!("cannot start the batch worker: {e}")))?;
        Ok(PredictionService { core })
    }

    /// What the service serves.
    pub fn info(&self) -> &ServiceInfo {
        &self.core.info
    }

    /// Point additions per query of the decryption (bit-plane method), if it was chosen.
    pub fn additions_per_query(&self) -> Option<usize> {
        self.core.decryptor.additions_per_ciphertext()
    }

    /// Queries answered so far.
    pub fn stats(&self) -> ServiceStats {
        let c = &self.core.counters;
        ServiceStats {
            predictions: c.predictions.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
        }
    }

    /// The largest request frame a query needs: its ciphertext's encoding and some slack.
    pub fn frame_limit(&self) -> usize {
        query_frame_limit(self.core.row_len)
    }

    /// Serves on `listener` in a background thread with `settings` (see [`net::spawn`]).
    pub fn spawn(
        &self,
        listener: TcpListener,
        settings: Settings,
    ) -> Result<net::ServerHandle, InferenceError> {
        Ok(net::spawn(listener, self.clone(), settings)?)
    }

    /// Answers one query (the work of [`Service::respond`], without the network).
    pub fn predict(&self, params: &[u8; 32], query: &[u8]) -> Result<Prediction, String> {
        let core = &self.core;
        core.counters.inflight.fetch_add(1, Ordering::SeqCst);
        let out = self.check_and_submit(params, query);
        let counter = if out.is_ok() {
            &core.counters.predictions
        } else {
            &core.counters.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        out
    }

    fn check_and_submit(&self, params: &[u8; 32], query: &[u8]) -> Result<Prediction, String> {
        let job = self.check(params, query).inspect_err(|_| {
            self.core.counters.inflight.fetch_sub(1, Ordering::SeqCst);
        })?;
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut q = lock(&self.core.batcher.queue);
            q.push_back(Job { ct: job, reply: tx });
        }
        self.core.batcher.ready.notify_one();
        rx.recv()
            .unwrap_or_else(|_| Err("the prediction service is shutting down".into()))
    }

    /// Decodes a query and checks its parameters and length.
    fn check(&self, params: &[u8; 32], query: &[u8]) -> Result<FeipCiphertext<Curve>, String> {
        let core = &self.core;
        if params != &core.info.params {
            return Err(format!(
                "the query was encrypted under other public parameters (fingerprint {}, this \
                 service holds keys under {}): fetch the parameters from the service's authority",
                crate::dataset::hex(&params[..8]),
                crate::dataset::hex(&core.info.params[..8])
            ));
        }
        let ct = FeipCiphertext::<Curve>::from_bytes(query)
            .map_err(|e| format!("the query does not decode: {e}"))?;
        if ct.elements().len() != core.row_len {
            return Err(format!(
                "the query has {} elements, the model takes {} ({} features and the bias)",
                ct.elements().len(),
                core.row_len,
                core.row_len - 1
            ));
        }
        Ok(ct)
    }

    /// Stops the batch worker (queued queries are answered with an error).
    pub fn stop(&self) {
        self.core.batcher.stop.store(true, Ordering::SeqCst);
        self.core.batcher.ready.notify_all();
    }
}

/// The largest request frame of a query with `row_len` elements.
pub fn query_frame_limit(row_len: usize) -> usize {
    64 * (row_len + 2) + 4096
}

fn check_model_fits(model: &QuantizedModel, params: &PublicParams) -> Result<(), InferenceError> {
    model
        .info()
        .check_fits(&params.dataset)
        .map_err(|e| InferenceError::Mismatch(e.to_string()))
}

impl Core {
    /// The batch worker: waits for a first query, then at most `batch_wait` for the batch to
    /// fill, decrypts it and answers every query in it.
    fn run_batches(&self) {
        while let Some(batch) = self.next_batch() {
            let started = Instant::now();
            let (cts, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|j| (j.ct, j.reply)).unzip();
            let answers = self.answer(&cts);
            self.counters.batches.fetch_add(1, Ordering::Relaxed);
            if self.options.verbose {
                eprintln!(
                    "prediction service: batch of {} in {:.1} ms",
                    cts.len(),
                    started.elapsed().as_secs_f64() * 1e3
                );
            }
            for (reply, answer) in replies.into_iter().zip(answers) {
                // The caller may have gone (its connection closed): nothing to do then.
                let _ = reply.send(answer);
            }
        }
        // Stopped: answer what is still queued.
        for job in lock(&self.batcher.queue).drain(..) {
            let _ = job
                .reply
                .send(Err("the prediction service is shutting down".into()));
        }
    }

    fn next_batch(&self) -> Option<Vec<Job>> {
        let b = &self.batcher;
        let mut q = lock(&b.queue);
        while q.is_empty() {
            if b.stop.load(Ordering::SeqCst) {
                return None;
            }
            q = b
                .ready
                .wait_timeout(q, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        // Wait only for queries that have arrived and are still being read or decoded: a
        // lone query on an idle service is decrypted at once.
        let deadline = Instant::now() + self.options.batch_wait;
        let expected = || {
            let inflight = self.counters.inflight.load(Ordering::SeqCst);
            inflight.clamp(1, self.options.max_batch)
        };
        while q.len() < expected() && !b.stop.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q = b
                .ready
                .wait_timeout(q, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let n = q.len().min(self.options.max_batch);
        self.counters.inflight.fetch_sub(n, Ordering::SeqCst);
        Some(q.drain(..n).collect())
    }

    /// Decrypts a batch and runs the rest of the network on every query that decrypted.
    fn answer(&self, cts: &[FeipCiphertext<Curve>]) -> Vec<Result<Prediction, String>> {
        let stats = fe::feip::DecryptStats::default();
        self.decryptor
            .decrypt_each(cts, &self.dlog, &stats)
            .into_iter()
            .map(|z| {
                let z = z.map_err(|e| {
                    format!(
                        "the query does not decrypt under this service's keys ({e}): it was \
                         tampered with or encrypted under another key"
                    )
                })?;
                let z =
                    ndarray::Array2::from_shape_vec((1, z.len()), z).map_err(|e| e.to_string())?;
                self.model
                    .predict(z.view())
                    .map_err(|e| e.to_string())?
                    .pop()
                    .ok_or_else(|| "no prediction".to_string())
            })
            .collect()
    }
}

impl Service for PredictionService {
    type Request = PredictRequest;
    type Response = PredictResponse;
    const ROLE: &'static str = "prediction service";

    fn respond(&self, peer: &str, request: PredictRequest) -> PredictResponse {
        match request {
            PredictRequest::Info => PredictResponse::Info(Box::new(self.core.info.clone())),
            PredictRequest::Predict { params, query } => match self.predict(&params, &query) {
                Ok(p) => PredictResponse::Prediction(p),
                Err(e) => {
                    if self.core.options.verbose {
                        eprintln!("prediction service: {peer}: refused a query: {e}");
                    }
                    PredictResponse::Error(e)
                }
            },
        }
    }

    fn refused(message: String) -> PredictResponse {
        PredictResponse::Refused(message)
    }

    fn error(message: String) -> PredictResponse {
        PredictResponse::Error(message)
    }

    fn busy(message: String) -> PredictResponse {
        PredictResponse::Busy(message)
    }

    fn failure(&self, peer_ip: &str, what: Failure, reason: &str) {
        if self.core.options.verbose {
            eprintln!("prediction service: {peer_ip}: {}: {reason}", what.as_str());
        }
    }

    fn close(&self) {
        self.stop();
    }
}

/// Encrypted queries: one row ciphertext per sample, and the time it took.
#[derive(Debug, Clone)]
pub struct Queries {
    /// The fingerprint of the parameters they are encrypted under.
    pub params: [u8; 32],
    /// The encodings of the ciphertexts, in sample order.
    pub queries: Vec<Vec<u8>>,
    /// Wall time of the encryption (tables included).
    pub seconds: f64,
    /// Wall time of building the encryption tables alone.
    pub table_seconds: f64,
}

/// Samples encrypted per call of the encryptor (bounds memory and feeds the progress bar).
const ENCRYPT_CHUNK: usize = 256;

/// Encrypts every sample of `data` as a query under `params` (all cores); labels, if any,
/// are not used.
pub fn encrypt_queries(
    data: &Inputs,
    params: &PublicParams,
    progress: bool,
) -> Result<Queries, InferenceError> {
    crate::client::check_fits(&data.info, params)
        .map_err(|e| InferenceError::Mismatch(e.to_string()))?;
    let started = Instant::now();
    let enc = FeipEncryptor::new(&params.row);
    let table_seconds = started.elapsed().as_secs_f64();
    let pb = crate::progress_bar(progress, data.len() as u64, "encrypting queries");
    let mut queries = Vec::with_capacity(data.len());
    for start in (0..data.len()).step_by(ENCRYPT_CHUNK) {
        let end = (start + ENCRYPT_CHUNK).min(data.len());
        let rows: Vec<Vec<i64>> = (start..end).map(|i| data.row(i)).collect();
        queries.extend(enc.encrypt_many_to_bytes(&rows)?);
        pb.inc((end - start) as u64);
    }
    pb.finish_and_clear();
    Ok(Queries {
        params: params.fingerprint(),
        queries,
        seconds: started.elapsed().as_secs_f64(),
        table_seconds,
    })
}

/// The answer to one query and how long it took.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The prediction, or the service's error for this query.
    pub result: Result<Prediction, String>,
    /// From sending the query to reading its answer.
    pub latency: Duration,
}

/// Answers to a run of queries.
#[derive(Debug, Clone)]
pub struct Answers {
    /// One per query, in query order.
    pub answers: Vec<Answer>,
    /// Wall time from the first query sent to the last answer read.
    pub seconds: f64,
}

/// Sends every query to the service at `addr` with `parallel` queries in flight (one
/// connection each), retrying as `config` says; a query the service refuses is recorded with
/// its error and the others go on. Fails only if a connection cannot be made at all.
pub fn run_queries(
    addr: &str,
    token: &str,
    config: &ClientConfig,
    queries: &Queries,
    parallel: usize,
    progress: bool,
) -> Result<Answers, InferenceError> {
    if parallel == 0 {
        return Err(InferenceError::Setting(
            "--parallel must be at least 1".into(),
        ));
    }
    let n = queries.queries.len();
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Answer>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let pb = crate::progress_bar(progress, n as u64, "predicting");
    let started = Instant::now();
    std::thread::scope(|s| -> Result<(), InferenceError> {
        let workers: Vec<_> = (0..parallel.min(n.max(1)))
            .map(|_| {
                s.spawn(|| -> Result<(), InferenceError> {
                    let mut client = PredictionClient::connect_with(addr, token, config.clone())?;
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= n {
                            return Ok(());
                        }
                        let t = Instant::now();
                        let result =
                            match client.predict(queries.params, queries.queries[i].clone()) {
                                Ok(p) => Ok(p),
                                Err(ProtocolError::Server { message, .. }) => Err(message),
                                Err(e) => return Err(e.into()),
                            };
                        *lock(&slots[i]) = Some(Answer {
                            result,
                            latency: t.elapsed(),
                        });
                        pb.inc(1);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| InferenceError::Setting("a query thread panicked".into()))??;
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let answers = slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .ok_or_else(|| InferenceError::Setting("a query was not sent".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Answers { answers, seconds })
}
