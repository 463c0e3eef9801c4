//! Token batches: truncation, padding, length grouping and packing.
//!
//! A `DataLoader` is a pure function of (samples, config, epoch): the batch at a
//! data-loader position (epoch, batch index) is always the same, so a checkpoint only
//! needs to store that position to resume bit for bit.
use std::collections::BTreeSet;

use crate::mask::TokenizedSample;
use crate::rng::SplitMix64;

/// One training batch, row-major `[batch_size, seq_len]` everywhere.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// Restart at 0 for each packed sample; 0 on padding.
    pub position_ids: Vec<u32>,
    /// 0 = padding; the samples of a row are 1, 2, ... Attention must stay within a segment.
    pub segment_ids: Vec<u32>,
    /// 1.0 where token i is a loss token (predicted from token i-1 of the same segment).
    pub loss_mask: Vec<f32>,
    pub loss_tokens: usize,
    /// Which prepared samples each row holds (for debugging and per-sample metrics).
    pub rows: Vec<Vec<usize>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    /// Rows per batch (the last batch of an epoch may have fewer).
    pub batch_size: usize,
    /// Row length cap; also the packing capacity.
    pub max_seq_len: usize,
    /// Pack several samples into one row (best-fit-decreasing).
    pub packing: bool,
    /// Without packing: batch samples of similar length together to waste less padding.
    pub group_by_length: bool,
    pub pad_token_id: u32,
    pub seed: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { batch_size: 4, max_seq_len: 2048, packing: false, group_by_length: true, pad_token_id: 0, seed: 42 }
    }
}

/// The outcome of fitting samples to `max_seq_len`.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub samples: Vec<TokenizedSample>,
    /// For each kept sample, its index in the input.
    pub source_indices: Vec<usize>,
    /// How many kept samples were cut to `max_seq_len`.
    pub truncated: usize,
    /// Input indices dropped because no loss token survived truncation.
    pub dropped: Vec<usize>,
}

impl Prepared {
    /// One line for the user, or `None` when nothing was cut.
    pub fn warning(&self, max_seq_len: usize) -> Option<String> {
        if self.truncated == 0 && self.dropped.is_empty() {
            return None;
        }
        let mut text = format!("{} sample(s) longer than {max_seq_len} tokens were truncated", self.truncated + self.dropped.len());
        if !self.dropped.is_empty() {
            text.push_str(&format!(
                "; {} of them lost every loss token and were dropped (e.g. sample {})",
                self.dropped.len(),
                self.dropped[0]
            ));
        }
        Some(text)
    }
}

/// Truncate every sample to `max_seq_len` (keeping the start) and drop those left with no
/// loss token. A sample's first token never counts (nothing predicts it).
pub fn prepare_samples(samples: Vec<TokenizedSample>, max_seq_len: usize) -> Prepared {
    let mut prepared = Prepared::default();
    for (i, mut sample) in samples.into_iter().enumerate() {
        let was_long = sample.len() > max_seq_len;
        if was_long {
            sample.input_ids.truncate(max_seq_len);
            sample.loss_mask.truncate(max_seq_len);
        }
        if sample.loss_mask.iter().skip(1).all(|&m| m == 0) {
            prepared.dropped.push(i);
            continue;
        }
        prepared.truncated += usize::from(was_long);
        prepared.samples.push(sample);
        prepared.source_indices.push(i);
    }
    prepared
}

/// Best-fit-decreasing: longest first, each into the open row with the least room that
/// still fits it. Returns rows of sample indices; deterministic (ties by index).
pub fn pack_best_fit_decreasing(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (room left, row index): the first entry with room >= len is the best fit.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let len = lengths[i].min(capacity);
        match open.range((len, 0)..).next().copied() {
            Some((room, row)) => {
                open.remove(&(room, row));
                rows[row].push(i);
                open.insert((room - len, row));
            }
            None => {
                rows.push(vec![i]);
                open.insert((capacity - len, rows.len() - 1));
            }
        }
    }
    rows
}

/// Swaps the longest of `items` (by `len`; ties: the earlier) to the front; the others keep
/// their shuffled order. Cut into batches afterwards, the first batch is the largest one
/// (only the last batch can hold fewer rows), for any batch size.
pub fn longest_first(items: &mut [usize], len: impl Fn(usize) -> usize) {
    if let Some(longest) = (0..items.len()).max_by_key(|&k| (len(items[k]), std::cmp::Reverse(k))) {
        items.swap(0, longest);
    }
}

/// Swaps the epoch's largest batch (padded tokens: rows x the longest row; ties: the
/// longer row, then the earlier batch) to the front, so the first optimizer step of an
/// epoch holds its peak memory and a run that will not fit fails in its first seconds,
/// not hours in. The other batches keep their shuffled order. `row_len` gives a row's
/// tokens (capped by the collator at the loader's max_seq_len; equal caps compare equal).
pub fn largest_first(batches: &mut [Vec<usize>], row_len: impl Fn(usize) -> usize) {
    let size = |rows: &[usize]| {
        let longest = rows.iter().map(|&r| row_len(r)).max().unwrap_or(0);
        (rows.len() * longest, longest)
    };
    let largest = (0..batches.len()).max_by_key(|&b| (size(&batches[b]), std::cmp::Reverse(b)));
    if let Some(largest) = largest {
        batches.swap(0, largest);
    }
}

pub struct DataLoader {
    samples: Vec<TokenizedSample>,
    config: BatchConfig,
    /// Rows (sample indices per row) before the epoch shuffle.
    rows: Vec<Vec<usize>>,
}

impl DataLoader {
    /// `samples` should come from `prepare_samples` (longer ones are cut here anyway).
    pub fn new(samples: Vec<TokenizedSample>, config: BatchConfig) -> Self {
        let config = BatchConfig { batch_size: config.batch_size.max(1), max_seq_len: config.max_seq_len.max(1), ..config };
        let samples: Vec<TokenizedSample> = samples
            .into_iter()
            .map(|mut s| {
                s.input_ids.truncate(config.max_seq_len);
                s.loss_mask.truncate(config.max_seq_len);
                s
            })
            .collect();
        let rows = if config.packing {
            let lengths: Vec<usize> = samples.iter().map(TokenizedSample::len).collect();
            pack_best_fit_decreasing(&lengths, config.max_seq_len)
        } else {
            (0..samples.len()).map(|i| vec![i]).collect()
        };
        DataLoader { samples, config, rows }
    }

    pub fn config(&self) -> &BatchConfig {
        &self.config
    }
    pub fn samples(&self) -> &[TokenizedSample] {
        &self.samples
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.rows.len().div_ceil(self.config.batch_size)
    }

    /// The row groups of every batch of `epoch`, in order.
    pub fn epoch_plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = SplitMix64::derived(self.config.seed, epoch);
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        rng.shuffle(&mut order);
        let batch_size = self.config.batch_size;
        let row_len = |r: usize| self.rows[r].iter().map(|&s| self.samples[s].len()).sum::<usize>();
        if !self.config.group_by_length || self.config.packing {
            // The longest row leads the epoch, so the first micro-batch is the largest
            // (full rows x the longest row) whatever the batch size: moving rows, not
            // batches, keeps `--batch-size 4` equal to `--batch-size 2` with accumulation 2.
            longest_first(&mut order, row_len);
            return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
        }
        // transformers' LengthGroupedSampler: sort mega-batches of 50 batches by length,
        // cut into batches, shuffle the batches; the longest batch goes first so memory
        // problems show at step 1, not hours in.
        let mut batches: Vec<Vec<usize>> = Vec::new();
        for mega in order.chunks(batch_size * 50) {
            let mut mega = mega.to_vec();
            mega.sort_by(|&a, &b| row_len(b).cmp(&row_len(a)).then(a.cmp(&b)));
            batches.extend(mega.chunks(batch_size).map(<[usize]>::to_vec));
        }
        rng.shuffle(&mut batches);
        largest_first(&mut batches, row_len);
        batches
    }

    /// The batch at data-loader position (epoch, index). `None` past the epoch's end.
    pub fn batch(&self, epoch: u64, index: usize) -> Option<Batch> {
        let plan = self.epoch_plan(epoch);
        plan.get(index).map(|rows| self.collate(rows))
    }

    /// Every batch of an epoch (computes the plan once).
    pub fn epoch(&self, epoch: u64) -> impl Iterator<Item = Batch> + '_ {
        self.epoch_plan(epoch).into_iter().map(move |rows| self.collate(&rows))
    }

    /// The rows `row_ids` (positions in the unshuffled row list; without packing, sample
    /// indices) padded to the longest one and laid out row-major.
    pub fn collate(&self, row_ids: &[usize]) -> Batch {
        let rows: Vec<&Vec<usize>> = row_ids.iter().map(|&r| &self.rows[r]).collect();
        let seq_len = rows
            .iter()
            .map(|row| row.iter().map(|&s| self.samples[s].len()).sum::<usize>())
            .max()
            .unwrap_or(0)
            .clamp(1, self.config.max_seq_len);
        let n = rows.len() * seq_len;
        let mut batch = Batch {
            batch_size: rows.len(),
            seq_len,
            input_ids: vec![self.config.pad_token_id; n],
            position_ids: vec![0; n],
            segment_ids: vec![0; n],
            loss_mask: vec![0.0; n],
            loss_tokens: 0,
            rows: rows.iter().map(|r| r.to_vec()).collect(),
        };
        for (r, row) in rows.iter().enumerate() {
            let mut at = r * seq_len;
            let row_end = at + seq_len;
            for (segment, &s) in row.iter().enumerate() {
                let sample = &self.samples[s];
                let len = sample.len().min(row_end - at);
                for i in 0..len {
                    batch.input_ids[at + i] = sample.input_ids[i];
                    batch.position_ids[at + i] = i as u32;
                    batch.segment_ids[at + i] = segment as u32 + 1;
                    // Token 0 of a segment has no predecessor inside its sample.
                    if i > 0 && sample.loss_mask[i] != 0 {
                        batch.loss_mask[at + i] = 1.0;
                        batch.loss_tokens += 1;
                    }
                }
                at += len;
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize, loss_from: usize) -> TokenizedSample {
        TokenizedSample {
            input_ids: (1..=len as u32).collect(),
            loss_mask: (0..len).map(|i| u8::from(i >= loss_from)).collect(),
        }
    }

    #[test]
    fn truncation_counts_and_drops() {
        let prepared = prepare_samples(vec![sample(10, 2), sample(10, 8), sample(4, 1)], 6);
        assert_eq!(prepared.truncated, 1);
        assert_eq!(prepared.dropped, vec![1]);
        assert_eq!(prepared.source_indices, vec![0, 2]);
        assert_eq!(prepared.samples[0].len(), 6);
        assert!(prepared.warning(6).unwrap().contains("dropped"));
    }

    #[test]
    fn best_fit_decreasing_fills_tightest_rows() {
        let rows = pack_best_fit_decreasing(&[6, 5, 4, 3, 2, 2], 8);
        // 6 -> new, 5 -> new, 4 -> new, 3 -> row with 5 (room 3), 2 -> row with 6, 2 -> row with 4.
        assert_eq!(rows, vec![vec![0, 4], vec![1, 3], vec![2, 5]]);
    }

    #[test]
    fn packed_rows_restart_positions_and_never_mix_segments() {
        let samples = vec![sample(5, 2), sample(3, 1), sample(4, 0)];
        let config = BatchConfig { batch_size: 8, max_seq_len: 8, packing: true, ..BatchConfig::default() };
        let loader = DataLoader::new(samples, config);
        let batch = loader.batch(0, 0).unwrap();
        assert_eq!(batch.batch_size, 2);
        assert_eq!(batch.seq_len, 8);
        for r in 0..batch.batch_size {
            let segs = &batch.segment_ids[r * 8..(r + 1) * 8];
            let pos = &batch.position_ids[r * 8..(r + 1) * 8];
            for i in 0..8 {
                if segs[i] == 0 {
                    continue;
                }
                let starts = i == 0 || segs[i - 1] != segs[i];
                assert_eq!(pos[i] == 0, starts, "row {r} token {i}");
                if starts {
                    assert_eq!(batch.loss_mask[r * 8 + i], 0.0, "a segment's first token is never a loss token");
                }
            }
        }
        // sample 2 has loss from token 0, which cannot count: 3 + 2 + 3 loss tokens.
        assert_eq!(batch.loss_tokens, 3 + 2 + 3);
    }

    #[test]
    fn batches_are_a_deterministic_function_of_the_position() {
        let samples: Vec<TokenizedSample> = (1..=37).map(|n| sample(n, 0)).collect();
        let config = BatchConfig { batch_size: 4, max_seq_len: 64, ..BatchConfig::default() };
        let a = DataLoader::new(samples.clone(), config.clone());
        let b = DataLoader::new(samples, config);
        assert_eq!(a.batches_per_epoch(), 10);
        assert_eq!(a.batch(3, 7), b.batch(3, 7));
        assert_ne!(a.epoch_plan(0), a.epoch_plan(1));
        let mut seen: Vec<usize> = a.epoch(2).flat_map(|b| b.rows.into_iter().flatten()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..37).collect::<Vec<_>>(), "each sample once per epoch");
        let first = a.batch(0, 0).unwrap();
        assert_eq!(first.seq_len, 37, "the longest batch comes first");
        assert!(a.batch(0, 10).is_none());
    }

    /// Without length grouping (and with packing) the shuffle decides the order, except that
    /// the largest batch of every epoch comes first: the first step holds the peak memory.
    #[test]
    fn every_epoch_starts_with_its_largest_batch_in_every_mode() {
        let samples: Vec<TokenizedSample> = (0..23).map(|i| sample(3 + (i * 7) % 29, 0)).collect();
        let size = |b: &Batch| b.batch_size * b.seq_len;
        for (packing, group_by_length) in [(false, false), (true, false), (false, true)] {
            let config = BatchConfig { batch_size: 3, max_seq_len: 40, packing, group_by_length, ..BatchConfig::default() };
            let loader = DataLoader::new(samples.clone(), config);
            for epoch in 0..4 {
                let batches: Vec<Batch> = loader.epoch(epoch).collect();
                let largest = batches.iter().map(size).max().unwrap();
                assert_eq!(size(&batches[0]), largest, "packing {packing}, grouped {group_by_length}, epoch {epoch}");
                assert_eq!(batches.iter().map(|b| b.rows.len()).sum::<usize>(), loader.rows.len());
            }
        }
        // The shuffle still decides the rest: two epochs differ beyond their first batch.
        let config = BatchConfig { batch_size: 3, max_seq_len: 40, group_by_length: false, ..BatchConfig::default() };
        let loader = DataLoader::new(samples.clone(), config.clone());
        assert_ne!(loader.epoch_plan(0)[1..], loader.epoch_plan(1)[1..]);
        // The row order does not depend on the batch size (batch 6 = batch 3 x accumulation 2).
        for packing in [false, true] {
            let rows_in_order = |batch_size: usize| -> Vec<usize> {
                let loader = DataLoader::new(samples.clone(), BatchConfig { batch_size, packing, ..config.clone() });
                loader.epoch_plan(2).concat()
            };
            assert_eq!(rows_in_order(6), rows_in_order(3));
            assert_eq!(rows_in_order(6), rows_in_order(1));
        }
    }
}
