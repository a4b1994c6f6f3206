//! The server's resident models: those named at start, kept for its life, and those loaded
//! on first use, at most `max_loaded` of them, the least recently used evicted first.

use crate::error::Result;
use crate::model::{Model, ModelOptions};

use super::request::ModelKey;

pub(crate) struct Models {
    /// Options every model is opened with (its path aside).
    base: ModelOptions,
    /// Models named at start: never evicted.
    pinned: Vec<(ModelKey, Model)>,
    /// Models loaded on first use, with the tick of their last use.
    loaded: Vec<(ModelKey, Model, u64)>,
    max_loaded: usize,
    tick: u64,
}

impl Models {
    /// Opens every model of `pinned` now (a broken one fails the server's start).
    pub fn open(base: ModelOptions, pinned: &[ModelKey], max_loaded: usize) -> Result<Models> {
        let mut models = Models {
            base,
            pinned: Vec::new(),
            loaded: Vec::new(),
            max_loaded,
            tick: 0,
        };
        for key in pinned {
            let model = models.load(key)?;
            models.pinned.push((key.clone(), model));
        }
        Ok(models)
    }

    fn load(&self, key: &ModelKey) -> Result<Model> {
        let path = match key {
            ModelKey::Default => None,
            ModelKey::Path(p) => Some(p.clone()),
        };
        ModelOptions {
            path,
            ..self.base.clone()
        }
        .open()
    }

    /// The model of `key`, loaded if it is not resident.
    pub fn get(&mut self, key: &ModelKey) -> Result<&mut Model> {
        self.tick += 1;
        if let Some(i) = self.pinned.iter().position(|(k, _)| k == key) {
            return Ok(&mut self.pinned[i].1);
        }
        let i = match self.loaded.iter().position(|(k, _, _)| k == key) {
            Some(i) => i,
            None => {
                // Evicted before the new one is opened, so two never need memory at once.
                if self.loaded.len() >= self.max_loaded.max(1) {
                    let lru = (0..self.loaded.len())
                        .min_by_key(|&i| self.loaded[i].2)
                        .expect("at least one loaded");
                    let (old, ..) = self.loaded.remove(lru);
                    log::info!("serve: evicting model {old} (least recently used)");
                }
                let model = self.load(key)?;
                self.loaded.push((key.clone(), model, 0));
                self.loaded.len() - 1
            }
        };
        self.loaded[i].2 = self.tick;
        Ok(&mut self.loaded[i].1)
    }

    /// Drops `key`'s model (after a panic ran inside it: the next request reloads it).
    pub fn forget(&mut self, key: &ModelKey) -> Result<()> {
        self.loaded.retain(|(k, _, _)| k != key);
        if let Some(i) = self.pinned.iter().position(|(k, _)| k == key) {
            self.pinned[i].1 = self.load(key)?;
        }
        Ok(())
    }

    /// The resident models' keys, for `/health`.
    pub fn keys(&self) -> Vec<String> {
        let pinned = self.pinned.iter().map(|(k, _)| k.to_string());
        pinned
            .chain(self.loaded.iter().map(|(k, _, _)| k.to_string()))
            .collect()
    }
}
