//! `primitives`: single-core costs of the FE schemes' operations against the vector length
//! and the size of the key entries (operands), on Ristretto255 and secp256k1.
//!
//! Inputs are random: pixel-like plaintexts in `0..=255` and signed key entries of the given
//! bits (`|y| ≤ 2^(bits-1) - 1`). Every operation runs inside a one-thread rayon pool, and the
//! reported figure is the median over repetitions (at least three, and at least
//! `--min-time` seconds in total). Decryption includes the bounded discrete log with the
//! trainer's table (±2^19 baby steps, built beforehand on all cores).

use crate::common::{progress, Stopwatch, Summary};
use crate::plot::{self, Line, LineChart, Marker, Panel, Series, COLORS};
use crate::table::{secs, write_csv, Table};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use fe::dlog::{DlogTable, DEFAULT_HALF_WIDTH};
use fe::febo::{self, FeboEncryptor, Op};
use fe::feip::{self, FeipEncryptor, FeipParams};
use fe::FeCurve;
use rand::Rng;
use std::path::PathBuf;

/// The curves to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CurveName {
    /// Ristretto255 (the project's default group).
    Ristretto,
    /// secp256k1.
    Secp256k1,
}

impl CurveName {
    fn label(self) -> &'static str {
        match self {
            CurveName::Ristretto => "Ristretto255",
            CurveName::Secp256k1 => "secp256k1",
        }
    }
}

/// Options of `primitives`.
#[derive(Args, Debug, Clone)]
pub struct PrimitivesArgs {
    /// Vector lengths n of FEIP (785 = 784 pixels and the bias input).
    #[arg(long, default_value = "16,64,256,785", value_parser = crate::common::parse_list_arg)]
    pub lengths: crate::common::List,
    /// Bits of the key entries (FEIP) and operands (FEBO), sign included.
    #[arg(long, default_value = "8,16", value_parser = crate::common::parse_list_arg)]
    pub key_bits: crate::common::List,
    /// Curves to measure.
    #[arg(long, value_delimiter = ',', default_value = "ristretto,secp256k1")]
    pub curves: Vec<CurveName>,
    /// Least total time per measurement, in seconds (at least 3 repetitions).
    #[arg(long, default_value_t = 0.2)]
    pub min_time: f64,
    /// Directory for the CSV files and plots (created if missing).
    #[arg(long, default_value = "results", value_name = "DIR")]
    pub out: PathBuf,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Half-width of the discrete-log table (the trainer's is 2^19).
    #[arg(long, default_value_t = DEFAULT_HALF_WIDTH, hide = true)]
    pub dlog_half_width: u64,
}

/// Columns of `primitives.csv`.
pub const COLUMNS: [&str; 7] = [
    "scheme",
    "curve",
    "operation",
    "n",
    "key_bits",
    "median_seconds",
    "repetitions",
];

/// One measurement.
#[derive(Debug, Clone)]
struct Row {
    scheme: &'static str,
    curve: &'static str,
    op: &'static str,
    n: usize,
    bits: Option<u32>,
    seconds: f64,
    reps: usize,
}

/// Median seconds of `f` over at least 3 runs and `min_time` seconds (at most 1000 runs).
fn median_time<T>(min_time: f64, mut f: impl FnMut() -> T) -> (f64, usize) {
    let mut times = Vec::new();
    let start = Stopwatch::start();
    while times.len() < 3 || (start.secs() < min_time && times.len() < 1000) {
        let t = Stopwatch::start();
        std::hint::black_box(f());
        times.push(t.secs());
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times.len())
}

fn random_key(rng: &mut impl Rng, n: usize, bits: u32) -> Vec<i64> {
    let q = (1i64 << (bits - 1)) - 1;
    (0..n).map(|_| rng.gen_range(-q..=q)).collect()
}

fn measure_curve<E: FeCurve>(
    args: &PrimitivesArgs,
    curve: &'static str,
    dlog: &DlogTable<E>,
    pb: &indicatif::ProgressBar,
) -> Result<Vec<Row>> {
    let mut rng = rand::thread_rng();
    let mut rows = Vec::new();
    let t = args.min_time;
    let mut push = |scheme, op, n, bits, (seconds, reps): (f64, usize)| {
        rows.push(Row {
            scheme,
            curve,
            op,
            n,
            bits,
            seconds,
            reps,
        })
    };
    for &n in &args.lengths.0 {
        let n = n as usize;
        pb.set_message(format!("{curve} FEIP n={n}"));
        let params = FeipParams::new(n, 255)?;
        push(
            "FEIP",
            "setup",
            n,
            None,
            median_time(t, || feip::setup::<E>(params)),
        );
        let (pk, msk) = feip::setup::<E>(params);
        push(
            "FEIP",
            "encryptor tables",
            n,
            None,
            median_time(t, || FeipEncryptor::new(&pk)),
        );
        let enc = FeipEncryptor::new(&pk);
        let x: Vec<i64> = (0..n).map(|_| rng.gen_range(0..=255)).collect();
        let mut err = None;
        push(
            "FEIP",
            "encrypt",
            n,
            None,
            median_time(t, || {
                if let Err(e) = enc.encrypt(&x) {
                    err = Some(e);
                }
            }),
        );
        let ct = enc.encrypt(&x)?;
        for &bits in &args.key_bits.0 {
            let y = random_key(&mut rng, n, bits);
            push(
                "FEIP",
                "derive key",
                n,
                Some(bits),
                median_time(t, || msk.derive_key(&y)),
            );
            let key = msk.derive_key(&y)?;
            let expected: i64 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
            let got = feip::decrypt(&params, &ct, &key, dlog)?;
            if got != expected {
                bail!("{curve} FEIP decryption gave {got}, expected {expected}");
            }
            push(
                "FEIP",
                "decrypt",
                n,
                Some(bits),
                median_time(t, || {
                    if let Err(e) = feip::decrypt(&params, &ct, &key, dlog) {
                        err = Some(e);
                    }
                }),
            );
        }
        if let Some(e) = err {
            return Err(e.into());
        }
        pb.inc(1);
    }
    pb.set_message(format!("{curve} FEBO"));
    push("FEBO", "setup", 1, None, median_time(t, febo::setup::<E>));
    let (pk, msk) = febo::setup::<E>();
    push(
        "FEBO",
        "encryptor tables",
        1,
        None,
        median_time(t, || FeboEncryptor::new(&pk)),
    );
    let enc = FeboEncryptor::new(&pk);
    let x: i64 = rng.gen_range(0..=255);
    push(
        "FEBO",
        "encrypt",
        1,
        None,
        median_time(t, || enc.encrypt(x)),
    );
    let ct = enc.encrypt(x);
    for &bits in &args.key_bits.0 {
        let q = (1i64 << (bits - 1)) - 1;
        let y = rng.gen_range(1..=q);
        for (op, name_k, name_d, expected) in [
            (Op::Sub, "derive key (sub)", "decrypt (sub)", x - y),
            (Op::Mul, "derive key (mul)", "decrypt (mul)", x * y),
        ] {
            let c = ct.commitment();
            push(
                "FEBO",
                name_k,
                1,
                Some(bits),
                median_time(t, || msk.derive_key(c, op, y)),
            );
            let key = msk.derive_key(c, op, y)?;
            let got = febo::decrypt(&ct, &key, 255, dlog)?;
            if got != expected {
                bail!("{curve} FEBO {op:?} decryption gave {got}, expected {expected}");
            }
            let mut err = None;
            push(
                "FEBO",
                name_d,
                1,
                Some(bits),
                median_time(t, || {
                    if let Err(e) = febo::decrypt(&ct, &key, 255, dlog) {
                        err = Some(e);
                    }
                }),
            );
            if let Some(e) = err {
                return Err(e.into());
            }
        }
    }
    pb.inc(1);
    Ok(rows)
}

/// The whole `primitives` experiment.
pub fn run(args: &PrimitivesArgs) -> Result<Summary> {
    let clock = Stopwatch::start();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating the output directory {}", args.out.display()))?;
    if args.lengths.0.is_empty() || args.lengths.0.contains(&0) {
        bail!("--lengths must be positive");
    }
    if let Some(b) = args.key_bits.0.iter().find(|&&b| !(2..=31).contains(&b)) {
        bail!("--key-bits {b} is outside 2..=31");
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .context("creating a one-thread pool")?;
    let steps = args.curves.len() * (args.lengths.0.len() + 1);
    let pb = progress(args.quiet, steps as u64, "primitives");
    let mut rows = Vec::new();
    for &c in &args.curves {
        pb.set_message(format!("{} discrete-log table", c.label()));
        rows.extend(match c {
            CurveName::Ristretto => {
                let dlog = DlogTable::<fe::Ristretto>::new(args.dlog_half_width)?;
                pool.install(|| measure_curve(args, c.label(), &dlog, &pb))?
            }
            CurveName::Secp256k1 => {
                let dlog = DlogTable::<fe::Secp256k1>::new(args.dlog_half_width)?;
                pool.install(|| measure_curve(args, c.label(), &dlog, &pb))?
            }
        });
    }
    pb.finish_and_clear();
    let out = &args.out;
    let csv_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.scheme.into(),
                r.curve.into(),
                r.op.into(),
                r.n.to_string(),
                r.bits.map(|b| b.to_string()).unwrap_or_default(),
                format!("{:.9}", r.seconds),
                r.reps.to_string(),
            ]
        })
        .collect();
    write_csv(&out.join("primitives.csv"), &COLUMNS, &csv_rows)?;

    // FEIP table: one row per (curve, operation, bits), one column per length.
    let lengths: Vec<usize> = args.lengths.0.iter().map(|&n| n as usize).collect();
    let mut headers = vec!["curve".to_string(), "operation".to_string()];
    headers.extend(lengths.iter().map(|n| format!("n = {n}")));
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut t1 = Table::new("FEIP, single core (median)", &header_refs);
    let mut keys: Vec<(&str, &str, Option<u32>)> = Vec::new();
    for r in rows.iter().filter(|r| r.scheme == "FEIP") {
        let k = (r.curve, r.op, r.bits);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let op_name = |op: &str, bits: Option<u32>| match bits {
        Some(b) => format!("{op}, {b}-bit key"),
        None => op.to_string(),
    };
    for (curve, op, bits) in &keys {
        let mut row = vec![curve.to_string(), op_name(op, *bits)];
        for n in &lengths {
            row.push(
                rows.iter()
                    .find(|r| {
                        r.scheme == "FEIP"
                            && r.curve == *curve
                            && r.op == *op
                            && r.bits == *bits
                            && r.n == *n
                    })
                    .map(|r| secs(r.seconds))
                    .unwrap_or_default(),
            );
        }
        t1.row(row);
    }
    t1.note(
        "Single decryptions, one key and one ciphertext, discrete log included; the trainer \
         decrypts whole batches at once (shared keys, bucket multi-scalar multiplication, \
         batched discrete logs, all cores), which is much cheaper per inner product: see \
         `timing`.",
    );
    let curves: Vec<&str> = args.curves.iter().map(|c| c.label()).collect();
    let mut h2 = vec!["operation"];
    h2.extend(curves.iter().copied());
    let mut t2 = Table::new("FEBO (one element), single core (median)", &h2);
    let mut ops: Vec<(&str, Option<u32>)> = Vec::new();
    for r in rows.iter().filter(|r| r.scheme == "FEBO") {
        if !ops.contains(&(r.op, r.bits)) {
            ops.push((r.op, r.bits));
        }
    }
    for (op, bits) in &ops {
        let mut row = vec![match bits {
            Some(b) => format!("{op}, {b}-bit operand"),
            None => op.to_string(),
        }];
        for c in &curves {
            row.push(
                rows.iter()
                    .find(|r| r.scheme == "FEBO" && r.curve == *c && r.op == *op && r.bits == *bits)
                    .map(|r| secs(r.seconds))
                    .unwrap_or_default(),
            );
        }
        t2.row(row);
    }

    // One panel per curve: FEIP operations against n.
    let mut panels = Vec::new();
    for c in &curves {
        let mut series = Vec::new();
        for (i, (curve, op, bits)) in keys.iter().filter(|k| k.0 == *c).enumerate() {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| {
                    r.scheme == "FEIP" && r.curve == *curve && r.op == *op && r.bits == *bits
                })
                .map(|r| (r.n as f64, r.seconds * 1e3))
                .collect();
            let s = Series::new(op_name(op, *bits), pts, COLORS[i % COLORS.len()]);
            series.push(if bits == &Some(16) {
                s.styled(Line::Dashed, Marker::Triangle)
            } else {
                s
            });
        }
        let mut chart = LineChart::new(
            &format!("FEIP on {c}, single core"),
            "vector length n",
            "milliseconds (median)",
            series,
        );
        chart.log_x = true;
        chart.log_y = true;
        chart.legend = plot::LegendPos::UpperLeft;
        panels.push(Panel::Lines(chart));
    }
    let figures = plot::save(
        out,
        "primitives",
        "FEIP costs against the vector length (log-log)",
        &panels,
    )?;
    Ok(Summary {
        name: "primitives".into(),
        description: format!(
            "Single-core FEIP and FEBO costs on {} for vector lengths {} and key/operand \
             sizes of {} bits (random pixel-like plaintexts and random signed keys).",
            curves.join(" and "),
            args.lengths
                .0
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            args.key_bits
                .0
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        ),
        tables: vec![t1, t2],
        figures,
        csv: vec!["primitives.csv".into()],
        seconds: clock.secs(),
        command: crate::common::command_line(),
    })
}
