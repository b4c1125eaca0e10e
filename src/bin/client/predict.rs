//! `client predict`: encrypted queries to a prediction service, and what came back.

use anyhow::{bail, Context, Result};
use cryptonn::cli::DataArgs;
use cryptonn::inference::{self, Answers, PredictionClient, Queries};
use cryptonn::protocol::{AuthorityClient, ClientConfig, ClientTransport};
use nn::data::{DatasetInfo, Inputs};
use std::path::PathBuf;
use std::time::Duration;

/// What `client predict` was asked.
pub struct Args {
    pub server: String,
    pub server_token: String,
    pub authority: String,
    pub token: String,
    pub data: DataArgs,
    pub parallel: usize,
    pub out: PathBuf,
    pub progress: bool,
    pub authority_transport: ClientTransport,
    pub server_transport: ClientTransport,
}

/// Fetches the parameters, checks the service, encrypts, sends, writes and summarises.
pub fn run(args: &Args) -> Result<()> {
    let to_authority = ClientConfig {
        transport: args.authority_transport.clone(),
        ..ClientConfig::default()
    };
    let to_server = ClientConfig {
        transport: args.server_transport.clone(),
        ..ClientConfig::default()
    };
    let params = AuthorityClient::connect_with(&args.authority, &args.token, to_authority)
        .and_then(|mut c| c.params())
        .with_context(|| format!("fetching the public parameters from {}", args.authority))?;
    let info = PredictionClient::connect_with(&args.server, &args.server_token, to_server.clone())
        .and_then(|mut c| c.info())
        .with_context(|| format!("asking the prediction service at {}", args.server))?;
    if info.params != params.fingerprint() {
        bail!(
            "the prediction service at {} holds keys under other public parameters than the \
             authority at {} gives: ask its operator which authority it uses",
            args.server,
            args.authority
        );
    }
    let data = args.data.load_inputs(&info.dataset)?;
    eprintln!(
        "querying {} ({}) with {} encrypted inputs{}",
        info.model,
        info.dataset,
        data.len(),
        if data.labels.is_some() {
            ""
        } else {
            " (without labels)"
        }
    );
    let queries = inference::encrypt_queries(&data, &params, args.progress)?;
    report_encryption(&queries);
    let answers = inference::run_queries(
        &args.server,
        &args.server_token,
        &to_server,
        &queries,
        args.parallel,
        args.progress,
    )?;
    write_csv(&args.out, &answers, &info.dataset)?;
    let failed = summarise(&answers, &data, args.parallel);
    println!("wrote {}", args.out.display());
    if failed > 0 {
        bail!("{failed} queries were refused (see the error column of the predictions)");
    }
    Ok(())
}

fn report_encryption(q: &Queries) {
    let n = q.queries.len().max(1);
    let bytes = q.queries.first().map_or(0, Vec::len);
    println!(
        "encrypted {} queries in {:.1} s ({:.2} ms per query with {} threads, {:.1} s of it \
         building the tables), {bytes} bytes per query",
        q.queries.len(),
        q.seconds,
        1e3 * (q.seconds - q.table_seconds) / n as f64,
        rayon::current_num_threads(),
        q.table_seconds
    );
}

/// The `p`-quantile of sorted durations, in milliseconds.
fn quantile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// Prints throughput, latency and, for labelled data, accuracy; returns the number of
/// refused queries.
fn summarise(a: &Answers, data: &Inputs, parallel: usize) -> usize {
    let mut lat: Vec<Duration> = a.answers.iter().map(|x| x.latency).collect();
    lat.sort_unstable();
    let ok = a.answers.iter().filter(|x| x.result.is_ok()).count();
    println!(
        "{ok} predictions in {:.1} s with {parallel} in flight: {:.0} predictions per hour; \
         latency p50 {:.1} ms, p99 {:.1} ms",
        a.seconds,
        ok as f64 * 3600.0 / a.seconds.max(1e-9),
        quantile_ms(&lat, 0.5),
        quantile_ms(&lat, 0.99)
    );
    let Some(labels) = &data.labels else {
        println!("no accuracy: the data has no labels");
        return a.answers.len() - ok;
    };
    let correct = a
        .answers
        .iter()
        .zip(labels)
        .filter(|(x, &l)| matches!(&x.result, Ok(p) if p.class == usize::from(l)))
        .count();
    println!(
        "accuracy {:.2}% ({correct} of {} labelled inputs)",
        100.0 * correct as f64 / data.len().max(1) as f64,
        data.len()
    );
    a.answers.len() - ok
}

/// One line per input: index, predicted class name, probabilities, error (if refused).
fn write_csv(path: &PathBuf, a: &Answers, info: &DatasetInfo) -> Result<()> {
    let tmp = path.with_extension("csv.tmp");
    let mut w =
        csv::Writer::from_path(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut header = vec!["index".to_string(), "predicted".to_string()];
    header.extend((0..info.classes).map(|k| format!("p_{}", info.class_name(k))));
    header.push("error".into());
    w.write_record(&header)?;
    for (i, x) in a.answers.iter().enumerate() {
        let mut row = vec![i.to_string()];
        match &x.result {
            Ok(p) => {
                row.push(info.class_name(p.class).into_owned());
                // Shortest exact form: the f32 read back is the one computed.
                row.extend(p.probabilities.iter().map(|v| v.to_string()));
                row.push(String::new());
            }
            Err(e) => {
                row.push(String::new());
                row.extend((0..info.classes).map(|_| String::new()));
                row.push(e.clone());
            }
        }
        w.write_record(&row)?;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
