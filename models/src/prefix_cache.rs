//! Prompt prefixes kept across requests: a server answering many requests that begin
//! with the same system prompt (or the same few-shot examples) prefills that part once.
//!
//! - Keys and values are kept in fixed-size blocks of [`BLOCK_TOKENS`] positions. A
//!   block is named by a hash of the adapter, every earlier token and its own tokens, so
//!   the blocks of a prompt form a chain (its block table) and two prompts that share
//!   their first k blocks share those k blocks (vLLM's automatic prefix caching).
//! - A block's keys and values depend only on the adapter the prompt ran through (LoRA
//!   on k/v) and the tokens up to its end (causal attention), so a prompt that finds its
//!   first k blocks prefills only the rest. The result equals a full prefill up to float
//!   rounding: the shorter prefill's products run over fewer rows, which may sum in
//!   another order (the test in `continuous` checks tokens and log-probs).
//! - Only full blocks are kept, and a lookup leaves at least one token of the prompt to
//!   prefill: its logits give the first new token.
//! - Bounded in bytes: the least recently used block goes first, and a block's
//!   descendants before it (every lookup touches a chain from its root, so a parent is
//!   never older than its children and a chain is never cut in the middle). Blocks the
//!   current request touched are never evicted for it.
//! - A hash collision cannot give a wrong answer: each block keeps its adapter, its
//!   tokens and its parent's name, and a lookup walks the chain from the root comparing
//!   all three.
//! - Adapters can change under a name (a server unloads and reloads one): the owner calls
//!   [`PrefixCache::forget_adapter`] then.
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use candle_core::Tensor;

use crate::decoder::KvCache;

/// Positions per block (vLLM's default). Smaller blocks share more of two prompts that
/// part mid-block; larger ones cost fewer tensors per lookup.
pub const BLOCK_TOKENS: usize = 16;

/// One block of a prompt chain.
struct Block {
    adapter: Option<String>,
    parent: Option<u64>,
    tokens: Vec<u32>,
    /// Per layer: keys and values [1, kv_heads, BLOCK_TOKENS, d].
    layers: Vec<(Tensor, Tensor)>,
    bytes: usize,
    depth: usize,
    last_used: u64,
}

/// What a cache has done since it was made (`serve` logs it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompts looked up, and those that found at least one block.
    pub lookups: u64,
    pub hits: u64,
    /// Prompt tokens looked up, and those whose keys came from the cache.
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub blocks: usize,
    pub bytes: usize,
    pub evicted_blocks: u64,
}

/// The leading part of a prompt found in the cache.
pub struct PrefixHit {
    /// Positions covered (a multiple of [`BLOCK_TOKENS`]).
    pub tokens: usize,
    /// A one-row cache holding those positions, ready for the rest of the prompt.
    pub cache: KvCache,
}

pub struct PrefixCache {
    budget_bytes: usize,
    blocks: HashMap<u64, Block>,
    bytes: usize,
    clock: u64,
    stats: PrefixStats,
}

impl PrefixCache {
    /// A cache that holds at most `budget_bytes` of keys and values.
    pub fn new(budget_bytes: usize) -> Self {
        Self { budget_bytes, blocks: HashMap::new(), bytes: 0, clock: 0, stats: PrefixStats::default() }
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats { blocks: self.blocks.len(), bytes: self.bytes, ..self.stats }
    }

    /// The longest run of cached blocks `prompt` begins with (through `adapter`), leaving
    /// at least its last token uncached; None when not even its first block is held.
    pub fn lookup(&mut self, adapter: Option<&str>, prompt: &[u32]) -> candle_core::Result<Option<PrefixHit>> {
        self.clock += 1;
        self.stats.lookups += 1;
        self.stats.prompt_tokens += prompt.len() as u64;
        let chain = self.cached_chain(adapter, prompt);
        if chain.is_empty() {
            return Ok(None);
        }
        for name in &chain {
            if let Some(b) = self.blocks.get_mut(name) {
                b.last_used = self.clock;
            }
        }
        let layer_count = self.blocks[&chain[0]].layers.len();
        let mut layers = Vec::with_capacity(layer_count);
        for l in 0..layer_count {
            let ks: Vec<&Tensor> = chain.iter().map(|n| &self.blocks[n].layers[l].0).collect();
            let vs: Vec<&Tensor> = chain.iter().map(|n| &self.blocks[n].layers[l].1).collect();
            layers.push((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?));
        }
        let tokens = chain.len() * BLOCK_TOKENS;
        self.stats.hits += 1;
        self.stats.cached_tokens += tokens as u64;
        Ok(Some(PrefixHit { tokens, cache: KvCache::from_layers(layers)? }))
    }

    /// Keep the full blocks of `prompt`, whose keys and values `prefilled` holds (one row,
    /// at least the prompt's positions), that the cache lacks; stops early when the
    /// budget is spent on blocks the current request uses.
    pub fn insert(&mut self, adapter: Option<&str>, prompt: &[u32], prefilled: &KvCache) -> candle_core::Result<()> {
        if prefilled.len() < prompt.len() {
            candle_core::bail!("prefix cache: the prefilled cache holds {} positions of a {}-token prompt", prefilled.len(), prompt.len());
        }
        let mut parent = None;
        for (depth, tokens) in prompt.chunks_exact(BLOCK_TOKENS).enumerate() {
            let name = block_name(adapter, parent, tokens);
            match self.blocks.get_mut(&name) {
                Some(b) if b.matches(adapter, parent, tokens) => b.last_used = self.clock,
                // A different block under the same name: leave it (a later lookup misses).
                Some(_) => return Ok(()),
                None => {
                    let mut layers = Vec::with_capacity(prefilled.layer_count());
                    for l in 0..prefilled.layer_count() {
                        layers.push(prefilled.row_positions(l, depth * BLOCK_TOKENS, BLOCK_TOKENS)?);
                    }
                    let bytes = layers.iter().map(|(k, v)| tensor_bytes(k) + tensor_bytes(v)).sum();
                    if !self.make_room(bytes) {
                        return Ok(());
                    }
                    self.bytes += bytes;
                    let block = Block { adapter: adapter.map(str::to_string), parent, tokens: tokens.to_vec(), layers, bytes, depth, last_used: self.clock };
                    self.blocks.insert(name, block);
                }
            }
            parent = Some(name);
        }
        Ok(())
    }

    /// Drop every block made through `adapter` (None: the base model's).
    pub fn forget_adapter(&mut self, adapter: Option<&str>) {
        let before = self.blocks.len();
        self.blocks.retain(|_, b| b.adapter.as_deref() != adapter);
        if self.blocks.len() != before {
            self.bytes = self.blocks.values().map(|b| b.bytes).sum();
        }
    }

    /// The names of the cached blocks `prompt` begins with, root first, leaving at least
    /// its last token out.
    fn cached_chain(&self, adapter: Option<&str>, prompt: &[u32]) -> Vec<u64> {
        let usable = prompt.len().saturating_sub(1) / BLOCK_TOKENS;
        let mut chain = Vec::new();
        let mut parent = None;
        for tokens in prompt.chunks_exact(BLOCK_TOKENS).take(usable) {
            let name = block_name(adapter, parent, tokens);
            match self.blocks.get(&name) {
                Some(b) if b.matches(adapter, parent, tokens) => chain.push(name),
                _ => break,
            }
            parent = Some(name);
        }
        chain
    }

    /// Evict least recently used blocks (deepest first among equals) until `bytes` more
    /// fit; false when they cannot without evicting blocks of the current request.
    fn make_room(&mut self, bytes: usize) -> bool {
        while self.bytes + bytes > self.budget_bytes {
            let victim = self.blocks.iter().filter(|(_, b)| b.last_used < self.clock).min_by_key(|(_, b)| (b.last_used, std::cmp::Reverse(b.depth))).map(|(&n, _)| n);
            let Some(name) = victim else { return false };
            if let Some(b) = self.blocks.remove(&name) {
                self.bytes -= b.bytes;
                self.stats.evicted_blocks += 1;
            }
        }
        true
    }
}

impl Block {
    fn matches(&self, adapter: Option<&str>, parent: Option<u64>, tokens: &[u32]) -> bool {
        self.adapter.as_deref() == adapter && self.parent == parent && self.tokens == tokens
    }
}

/// A block's name: its adapter, its parent's name (which stands for every earlier
/// token) and its tokens. `DefaultHasher::new()` has fixed keys: names are stable.
fn block_name(adapter: Option<&str>, parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    adapter.hash(&mut h);
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A one-row, two-layer cache whose position p holds the value p + 1000 * layer.
    fn prefilled(len: usize) -> KvCache {
        let layer = |l: usize| {
            let t = Tensor::arange(0f32, len as f32, &Device::Cpu).unwrap().affine(1.0, 1000.0 * l as f64).unwrap().reshape((1, 1, len, 1)).unwrap();
            (t.clone(), t.affine(-1.0, 0.0).unwrap())
        };
        KvCache::from_layers(vec![layer(0), layer(1)]).unwrap()
    }

    fn prompt(len: usize, first: u32) -> Vec<u32> {
        (0..len as u32).map(|i| first + i).collect()
    }

    #[test]
    fn a_prompt_finds_the_full_blocks_it_shares_and_leaves_its_last_token() {
        let mut cache = PrefixCache::new(1 << 20);
        let system = prompt(40, 1);
        cache.insert(None, &system, &prefilled(40)).unwrap();
        assert_eq!(cache.stats().blocks, 2, "only full blocks are kept");
        // Shares the first 40 tokens: finds 2 blocks (32 positions), with their values.
        let mut longer = system.clone();
        longer.extend(prompt(10, 500));
        let hit = cache.lookup(None, &longer).unwrap().expect("a hit");
        assert_eq!(hit.tokens, 32);
        let (k, v) = hit.cache.row_positions(1, 0, 32).unwrap();
        assert_eq!(k.flatten_all().unwrap().to_vec1::<f32>().unwrap(), (0..32).map(|p| p as f32 + 1000.0).collect::<Vec<_>>());
        assert_eq!(v.flatten_all().unwrap().to_vec1::<f32>().unwrap()[5], -1005.0);
        // Exactly 32 tokens: the last block is left for the prefill (its logits are needed).
        assert_eq!(cache.lookup(None, &system[..32]).unwrap().unwrap().tokens, 16);
        // Differs in the first block, or another adapter: a miss.
        let mut other = system.clone();
        other[3] = 999;
        assert!(cache.lookup(None, &other).unwrap().is_none());
        assert!(cache.lookup(Some("a"), &system).unwrap().is_none());
        let s = cache.stats();
        assert_eq!((s.lookups, s.hits, s.cached_tokens), (4, 2, 48));
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used_chain_from_its_end() {
        let block_bytes = 2 * 2 * BLOCK_TOKENS * DType::F32.size_in_bytes();
        let mut cache = PrefixCache::new(3 * block_bytes);
        let (a, b) = (prompt(33, 1), prompt(33, 100));
        cache.lookup(None, &a).unwrap();
        cache.insert(None, &a, &prefilled(33)).unwrap();
        cache.lookup(None, &b).unwrap();
        cache.insert(None, &b, &prefilled(33)).unwrap();
        // b's second block needed room: a's last block went, a's first stays usable.
        assert_eq!(cache.stats().blocks, 3);
        assert_eq!(cache.stats().evicted_blocks, 1);
        assert_eq!(cache.lookup(None, &a).unwrap().unwrap().tokens, 16);
        assert_eq!(cache.lookup(None, &b).unwrap().unwrap().tokens, 32);
        // A budget smaller than one block keeps nothing.
        let mut tiny = PrefixCache::new(block_bytes - 1);
        tiny.insert(None, &a, &prefilled(33)).unwrap();
        assert_eq!(tiny.stats().blocks, 0);
    }

    #[test]
    fn forgetting_an_adapter_drops_only_its_blocks() {
        let mut cache = PrefixCache::new(1 << 20);
        let p = prompt(20, 7);
        cache.insert(None, &p, &prefilled(20)).unwrap();
        cache.insert(Some("a"), &p, &prefilled(20)).unwrap();
        cache.forget_adapter(Some("a"));
        assert!(cache.lookup(Some("a"), &p).unwrap().is_none());
        assert_eq!(cache.lookup(None, &p).unwrap().unwrap().tokens, 16);
        assert_eq!(cache.stats().blocks, 1);
    }
}
