//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use ndarray::{Array2, ArrayView2};
use nn::first_layer::{IntegerProducts, SeamError, LABEL_SCALE};
use nn::{Batches, Dataset};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A random dataset of `n` images of `rows x cols` pixels with labels below `classes`, in
/// which the label is readable from the brightest of the first `classes` pixels (so that it
/// is learnable).
pub fn synthetic(n: usize, rows: usize, cols: usize, classes: usize, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let f = rows * cols;
    let mut images = Array2::<u8>::zeros((n, f));
    let mut labels = Vec::with_capacity(n);
    for b in 0..n {
        let label = rng.gen_range(0..classes);
        for i in 0..f {
            images[[b, i]] = rng.gen_range(0..120);
        }
        images[[b, label % f]] = rng.gen_range(180..=255);
        labels.push(label as u8);
    }
    Dataset::grey_images(images, labels, rows, cols, classes).unwrap()
}

/// A second, independent integer implementation: textbook loops over the pixels, with no
/// shared code with `PlainIntegers` beyond the dataset.
pub struct NaiveIntegers {
    pub data: Dataset,
    pub batches: Batches,
    pub classes: usize,
    pub calls: usize,
}

impl NaiveIntegers {
    pub fn new(data: Dataset, batch: usize, classes: usize) -> Self {
        let batches = data.batches(batch, false).unwrap();
        NaiveIntegers {
            data,
            batches,
            classes,
            calls: 0,
        }
    }

    fn pixel(&self, sample: usize, i: usize) -> i64 {
        if i == self.data.features() {
            i64::from(self.data.info.x_bound)
        } else {
            self.data.values[[sample, i]] as i64
        }
    }
}

impl IntegerProducts for NaiveIntegers {
    fn forward_int(
        &mut self,
        batch: usize,
        w_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        self.calls += 1;
        let r = self.batches.range(batch).unwrap();
        let mut out = Array2::zeros((r.len(), w_q.nrows()));
        for (b, s) in r.enumerate() {
            for j in 0..w_q.nrows() {
                let mut acc = 0i64;
                for i in 0..w_q.ncols() {
                    acc += self.pixel(s, i) * w_q[[j, i]];
                }
                out[[b, j]] = acc;
            }
        }
        Ok(out)
    }

    fn backward_int(
        &mut self,
        batch: usize,
        delta_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        self.calls += 1;
        let r = self.batches.range(batch).unwrap();
        let n = self.data.features() + 1;
        let mut out = Array2::zeros((delta_q.ncols(), n));
        for j in 0..delta_q.ncols() {
            for i in 0..n {
                let mut acc = 0i64;
                for (b, s) in r.clone().enumerate() {
                    acc += delta_q[[b, j]] * self.pixel(s, i);
                }
                out[[j, i]] = acc;
            }
        }
        Ok(out)
    }

    fn output_error_int(
        &mut self,
        batch: usize,
        a_q: ArrayView2<i64>,
    ) -> Result<Array2<i64>, SeamError> {
        self.calls += 1;
        let r = self.batches.range(batch).unwrap();
        let mut out = a_q.to_owned();
        for (b, s) in r.enumerate() {
            for k in 0..self.classes {
                if self.data.labels[s] as usize == k {
                    out[[b, k]] -= LABEL_SCALE;
                }
            }
        }
        Ok(out)
    }

    fn num_batches(&self) -> usize {
        self.batches.len()
    }

    fn batch_len(&self, batch: usize) -> usize {
        self.batches.batch_len(batch)
    }

    fn input_bound(&self) -> u32 {
        self.data.info.x_bound
    }
}
