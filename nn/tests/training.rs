//! Learning, determinism, checkpoint/resume and the embedded subset.
#![allow(clippy::unwrap_used)]

mod common;

use nn::first_layer::{PlainIntegers, Quantized, Quantizer};
use nn::train::{evaluate, fit, train_epoch_from, Checkpoint, EpochState, FitConfig};
use nn::{mnist, Activation, Dataset, Model, ModelSpec, Optimizer, PlainFloat, Schedule};

fn xor() -> Dataset {
    let images = ndarray::array![[0u8, 0], [0, 255], [255, 0], [255, 255]];
    Dataset::grey_images(images, vec![0, 1, 1, 0], 1, 2, 2).unwrap()
}

#[test]
fn tiny_networks_learn_xor() {
    for act in Activation::ALL {
        let spec = ModelSpec::parse("2-8-2", act).unwrap();
        let mut model = Model::new(spec, 4).unwrap();
        let mut fl = PlainFloat::from_dataset(xor(), 4, false).unwrap();
        let mut opt = Optimizer::adam(0.05);
        let cfg = FitConfig {
            epochs: 400,
            progress: false,
            ..FitConfig::default()
        };
        let hist = fit(&mut model, &mut fl, &mut opt, Some(&xor()), &cfg).unwrap();
        let last = hist.last().unwrap();
        assert_eq!(last.test_accuracy, Some(1.0), "{act}: {last:?}");
        assert!(last.train_loss < 0.1, "{act}: {last:?}");
    }
}

#[test]
fn sgd_with_momentum_learns_a_separable_set() {
    let train = common::synthetic(600, 4, 4, 5, 1);
    let test = common::synthetic(200, 4, 4, 5, 2);
    let spec = ModelSpec::parse("16-12-5", Activation::Relu).unwrap();
    let mut model = Model::new(spec, 1).unwrap();
    let mut fl = PlainFloat::from_dataset(train, 20, false).unwrap();
    let mut opt = Optimizer::sgd(0.2, 0.9)
        .with_weight_decay(1e-4)
        .with_schedule(Schedule::StepDecay {
            every: 5,
            gamma: 0.5,
        });
    let cfg = FitConfig {
        epochs: 15,
        progress: false,
        ..FitConfig::default()
    };
    let hist = fit(&mut model, &mut fl, &mut opt, Some(&test), &cfg).unwrap();
    assert!(hist[0].train_loss > hist[14].train_loss);
    assert!(hist[14].test_accuracy.unwrap() > 0.95, "{:?}", hist[14]);
}

fn run(seed: u64) -> (Model, Vec<nn::EpochMetrics>) {
    let train = common::synthetic(100, 3, 3, 3, 7);
    let spec = ModelSpec::parse("9-7-3", Activation::Tanh).unwrap();
    let mut model = Model::new(spec, seed).unwrap();
    let mut fl = PlainFloat::from_dataset(train, 16, false).unwrap();
    let mut opt = Optimizer::adam(0.01);
    let cfg = FitConfig {
        epochs: 3,
        seed,
        progress: false,
        ..FitConfig::default()
    };
    let h = fit(&mut model, &mut fl, &mut opt, None, &cfg).unwrap();
    (model, h)
}

#[test]
fn same_seed_same_weights() {
    let (a, ha) = run(3);
    let (b, hb) = run(3);
    assert_eq!(a, b);
    assert_eq!(a.to_bytes().unwrap(), b.to_bytes().unwrap());
    for (x, y) in ha.iter().zip(&hb) {
        assert_eq!(
            (x.train_loss, x.train_accuracy),
            (y.train_loss, y.train_accuracy)
        );
    }
    let (c, _) = run(4);
    assert_ne!(a, c);
}

/// Runs 2 epochs with a quantized, stochastically rounded first layer, writing a checkpoint
/// to disk after every step. If `kill_at` is `Some((epoch, k))`, the run "crashes" right
/// after the checkpoint of step `k` of that epoch and resumes from the file with fresh objects.
fn run_with_checkpoints(kill_at: Option<(usize, usize)>, dir: &std::path::Path) -> Model {
    let train = common::synthetic(90, 3, 3, 3, 5);
    let q = Quantizer::new(8).stochastic(77);
    let make_fl = || {
        Quantized::new(
            PlainIntegers::from_dataset(train.clone(), 16, false).unwrap(),
            q,
        )
        .unwrap()
    };
    let spec = ModelSpec::parse("9-6-3", Activation::Relu).unwrap();
    let mut model = Model::new(spec, 1).unwrap();
    let mut opt = Optimizer::sgd(0.1, 0.9).with_schedule(Schedule::Cosine {
        total_epochs: 2,
        min_lr: 0.01,
    });
    let mut fl = make_fl();
    let path = dir.join("ckpt.bin");
    let mut state = EpochState::new(0, 6, 42, true);
    let mut crashed = false;
    loop {
        let result = train_epoch_from(
            &mut model,
            &mut fl,
            &mut opt,
            &mut state,
            false,
            |m, o, f, s, _, _| {
                let ck = Checkpoint {
                    model: m.clone(),
                    optimizer: o.clone(),
                    state: s.clone(),
                    history: vec![],
                    rounding_stream: f.rounding_stream(),
                    config: vec![],
                };
                ck.save(&path)
                    .map_err(|e| nn::TrainError::Callback(Box::new(e)))?;
                if !crashed && kill_at == Some((s.epoch, s.next)) {
                    return Err(nn::TrainError::State("killed".into()));
                }
                Ok(nn::train::Flow::Continue)
            },
        );
        match result {
            Ok(_) if state.epoch == 1 => return model,
            Ok(_) => state = EpochState::new(state.epoch + 1, 6, 42, true),
            Err(nn::TrainError::State(msg)) if msg == "killed" => {
                crashed = true;
                let ck = Checkpoint::load(&path).unwrap();
                model = ck.model;
                opt = ck.optimizer;
                state = ck.state;
                fl = make_fl();
                fl.set_rounding_stream(ck.rounding_stream);
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn resuming_from_a_checkpoint_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let straight = run_with_checkpoints(None, dir.path());
    for kill in [(0, 3), (1, 1), (1, 5)] {
        let resumed = run_with_checkpoints(Some(kill), dir.path());
        assert_eq!(straight, resumed, "killed at {kill:?}");
    }
}

#[test]
fn checkpoint_files_are_versioned() {
    let spec = ModelSpec::parse("4-3-2", Activation::Relu).unwrap();
    let ck = Checkpoint {
        model: Model::new(spec, 0).unwrap(),
        optimizer: Optimizer::adam(0.1),
        state: EpochState::new(2, 5, 1, true),
        history: vec![],
        rounding_stream: 17,
        config: vec![("--lr".into(), "0.1".into())],
    };
    assert!(ck.check_config(&[("--lr".into(), "0.1".into())]).is_ok());
    let e = ck
        .check_config(&[("--lr".into(), "0.2".into())])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--lr 0.1") && e.contains("--lr 0.2"), "{e}");
    assert!(ck.check_config(&[("--bits".into(), "8".into())]).is_err());
    let bytes = ck.to_bytes().unwrap();
    assert_eq!(Checkpoint::from_bytes(&bytes).unwrap(), ck);
    let model_bytes = ck.model.to_bytes().unwrap();
    assert!(matches!(
        Checkpoint::from_bytes(&model_bytes),
        Err(nn::ModelError::BadMagic { .. })
    ));
    let mut v2 = bytes.clone();
    v2[8] = 9;
    assert!(matches!(
        Checkpoint::from_bytes(&v2),
        Err(nn::ModelError::Version { found: 9, .. })
    ));
}

#[test]
fn embedded_subset_has_the_documented_sizes() {
    let (train, test) = mnist::embedded().unwrap();
    assert_eq!(train.len(), 6000);
    assert_eq!(test.len(), 1000);
    assert_eq!(train.values.dim(), (6000, 784));
}

/// The README's subset figure: >= 90 % test accuracy on the embedded subset. Skipped in
/// debug builds, where it is slow; run with `cargo test -p nn --release`.
#[test]
#[cfg_attr(debug_assertions, ignore)]
fn embedded_subset_reaches_ninety_percent() {
    let (train, test) = mnist::embedded().unwrap();
    let spec = ModelSpec::parse("784-128-32-10", Activation::Relu).unwrap();
    let mut model = Model::new(spec, 1).unwrap();
    let mut fl = PlainFloat::from_dataset(train, 64, false).unwrap();
    let mut opt = Optimizer::adam(1e-3).with_schedule(Schedule::Cosine {
        total_epochs: 10,
        min_lr: 0.0,
    });
    let cfg = FitConfig {
        epochs: 10,
        seed: 1,
        progress: false,
        ..FitConfig::default()
    };
    fit(&mut model, &mut fl, &mut opt, None, &cfg).unwrap();
    let ev = evaluate(&model, &test).unwrap();
    assert!(ev.accuracy >= 0.90, "accuracy {}", ev.accuracy);
    assert_eq!(
        ev.confusion.iter().map(|&v| v as usize).sum::<usize>(),
        1000
    );
}
