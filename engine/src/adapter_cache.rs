//! The adapters an engine keeps on its devices: least recently used first out, bounded by a count
//! and a memory budget. Sequences hold their adapter through an `Arc`, so an evicted adapter stays
//! alive until the last sequence using it finishes, and an overwritten adapter (new mtime or size,
//! so a new [`AdapterKey`]) is loaded afresh while running sequences keep the version they pinned.

use std::sync::Arc;

use crate::lora::{AdapterKey, PlacedAdapter};

pub struct AdapterCache {
    max_count: usize,
    max_bytes: u64,
    /// Most recently used last.
    entries: Vec<Arc<PlacedAdapter>>,
    pub hits: u64,
    pub misses: u64,
    pub loads: u64,
    pub evictions: u64,
}

impl AdapterCache {
    pub fn new(max_count: usize, max_bytes: u64) -> Self {
        Self {
            max_count: max_count.max(1),
            max_bytes,
            entries: Vec::new(),
            hits: 0,
            misses: 0,
            loads: 0,
            evictions: 0,
        }
    }

    /// The adapter for `key`, marked most recently used.
    pub fn get(&mut self, key: &AdapterKey) -> Option<Arc<PlacedAdapter>> {
        match self.entries.iter().position(|a| &a.key == key) {
            Some(i) => {
                let a = self.entries.remove(i);
                self.entries.push(a.clone());
                self.hits += 1;
                Some(a)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Adds a freshly loaded adapter, evicting the least recently used ones beyond the limits
    /// (and any older version of the same path).
    pub fn insert(&mut self, adapter: Arc<PlacedAdapter>) {
        self.loads += 1;
        self.entries.retain(|a| a.key.path != adapter.key.path);
        self.entries.push(adapter);
        while self.entries.len() > 1
            && (self.entries.len() > self.max_count || self.bytes() > self.max_bytes)
        {
            self.entries.remove(0);
            self.evictions += 1;
        }
    }

    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|a| a.bytes).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn keys(&self) -> Vec<AdapterKey> {
        self.entries.iter().map(|a| a.key.clone()).collect()
    }
}
