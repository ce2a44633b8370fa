//! Who owns a code: a module of its own, so that audit records and
//! ownership decisions both name it without depending on each other.

/// The Kubernetes object a code is bound to. Compared by `uid`, so a
/// resource deleted and re-created under the same name is a new owner.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}
