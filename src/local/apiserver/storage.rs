//! Objects, resource versions and the change log that watches read.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One write, as a watch reports it.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub storage: String,
    pub namespace: String,
    pub kind: ChangeKind,
    pub object: Value,
}

/// What a read-modify-write decides.
pub enum Write {
    Put(Value),
    Delete,
    Nothing,
}

/// A watch asked for a version older than the log keeps.
#[derive(Debug)]
pub struct Expired {
    pub oldest: u64,
}

type Key = (String, String);

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<String, BTreeMap<Key, Value>>,
    log: VecDeque<Change>,
    /// Every change with `rv <= compacted` has left the log.
    compacted: u64,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    rv: u64,
    objects: BTreeMap<String, Vec<Value>>,
}

pub struct Storage {
    inner: Mutex<Inner>,
    latest: watch::Sender<u64>,
    log_capacity: usize,
    state_file: Option<PathBuf>,
}

fn key_of(object: &Value) -> Key {
    let field = |name: &str| {
        object["metadata"][name]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    (field("namespace"), field("name"))
}

impl Storage {
    /// Empty storage, or the state saved in `state_file` when it exists.
    pub fn open(state_file: Option<PathBuf>, log_capacity: usize) -> std::io::Result<Self> {
        let mut inner = Inner::default();
        if let Some(path) = &state_file
            && path.exists()
        {
            let saved: Persisted = serde_json::from_slice(&std::fs::read(path)?)?;
            inner.rv = saved.rv;
            inner.compacted = saved.rv;
            for (storage, objects) in saved.objects {
                let map = inner.objects.entry(storage).or_default();
                for object in objects {
                    map.insert(key_of(&object), object);
                }
            }
        }
        let (latest, _) = watch::channel(inner.rv);
        Ok(Self {
            inner: Mutex::new(inner),
            latest,
            log_capacity: log_capacity.max(1),
            state_file,
        })
    }

    pub fn current_rv(&self) -> u64 {
        self.inner.lock().unwrap().rv
    }

    pub fn get(&self, storage: &str, namespace: &str, name: &str) -> Option<Value> {
        let inner = self.inner.lock().unwrap();
        inner
            .objects
            .get(storage)?
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Objects in key order (namespace, name), and the version they were read at.
    pub fn list(&self, storage: &str, namespace: Option<&str>) -> (Vec<Value>, u64) {
        let inner = self.inner.lock().unwrap();
        let items = inner
            .objects
            .get(storage)
            .map(|objects| {
                objects
                    .iter()
                    .filter(|((ns, _), _)| namespace.is_none_or(|wanted| ns == wanted))
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .unwrap_or_default();
        (items, inner.rv)
    }

    /// Reads the object, lets `decide` choose the write, and performs it
    /// atomically with a new resource version. Returns the stored object (or
    /// the deleted one), or `None` when nothing was written.
    pub fn write<E>(
        &self,
        storage: &str,
        namespace: &str,
        name: &str,
        decide: impl FnOnce(Option<&Value>) -> Result<Write, E>,
    ) -> Result<Option<Value>, E> {
        let mut inner = self.inner.lock().unwrap();
        let key = (namespace.to_owned(), name.to_owned());
        let current = inner.objects.get(storage).and_then(|m| m.get(&key));
        let existed = current.is_some();
        let write = decide(current)?;
        let rv = inner.rv + 1;
        let (kind, object) = match write {
            Write::Nothing => return Ok(None),
            Write::Put(mut object) => {
                object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                inner
                    .objects
                    .entry(storage.to_owned())
                    .or_default()
                    .insert(key, object.clone());
                let kind = if existed {
                    ChangeKind::Modified
                } else {
                    ChangeKind::Added
                };
                (kind, object)
            }
            Write::Delete => {
                let Some(mut object) = inner.objects.get_mut(storage).and_then(|m| m.remove(&key))
                else {
                    return Ok(None);
                };
                object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                (ChangeKind::Deleted, object)
            }
        };
        inner.rv = rv;
        inner.log.push_back(Change {
            rv,
            storage: storage.to_owned(),
            namespace: namespace.to_owned(),
            kind,
            object: object.clone(),
        });
        while inner.log.len() > self.log_capacity {
            if let Some(dropped) = inner.log.pop_front() {
                inner.compacted = dropped.rv;
            }
        }
        self.persist(&inner);
        drop(inner);
        self.latest.send_replace(rv);
        Ok(Some(object))
    }

    /// Changes after `rv`, or `Expired` when the log no longer reaches back that far.
    pub fn changes_since(&self, rv: u64) -> Result<Vec<Change>, Expired> {
        let inner = self.inner.lock().unwrap();
        if rv < inner.compacted {
            return Err(Expired {
                oldest: inner.compacted,
            });
        }
        Ok(inner.log.iter().filter(|c| c.rv > rv).cloned().collect())
    }

    /// Wakes up whenever a write happens.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    fn persist(&self, inner: &Inner) {
        let Some(path) = &self.state_file else {
            return;
        };
        let saved = Persisted {
            rv: inner.rv,
            objects: inner
                .objects
                .iter()
                .map(|(storage, objects)| (storage.clone(), objects.values().cloned().collect()))
                .collect(),
        };
        let tmp = path.with_extension("tmp");
        let result = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(error) = result {
            tracing::error!(%error, path = %path.display(), "cannot save the local API state");
        }
    }
}
