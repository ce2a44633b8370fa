//! The one error a reconcile of either kind returns: a variant per failed
//! operation, each saying which, and a category for the metrics.

use kube::runtime::finalizer;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("billing database: {0}")]
    Store(#[from] StoreError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("the {kind} has no namespace")]
    NotNamespaced { kind: String },
    /// Whether a CRD is being deleted could not be told, so a deletion of
    /// one of its resources neither revokes nor orphans yet.
    #[error(
        "cannot tell whether the CRD {crd} is being deleted (get customresourcedefinitions/{crd}): {source}"
    )]
    CrdCheck {
        crd: &'static str,
        #[source]
        source: kube::Error,
    },
    /// A deleted global copy waits for its unused share to be back at the
    /// hub (the leader's allotment loop returns it) before its finalizer goes.
    #[error(
        "global voucher {code}: {unspent} unspent units of this Sovereign's share are not yet back at the hub; the Voucher goes once they are"
    )]
    ShareNotReturned { code: String, unspent: u64 },
}

impl Error {
    /// The bounded label of the failures metric.
    /// Every category [`Error::category`] names (the metrics start each at 0).
    pub const CATEGORIES: [&'static str; 5] = [
        "database",
        "kubernetes",
        "finalizer",
        "invalid",
        "federation",
    ];

    pub fn category(&self) -> &'static str {
        match self {
            Error::Store(_) => "database",
            Error::Kube(_) | Error::CrdCheck { .. } => "kubernetes",
            Error::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => {
                    e.category()
                }
                _ => "finalizer",
            },
            Error::NotNamespaced { .. } => "invalid",
            Error::ShareNotReturned { .. } => "federation",
        }
    }
}
