//! A plain TCP proxy whose link a test can cut (test code only): every byte
//! passes unchanged until `cut`, which closes every open connection and
//! refuses new ones until `mend` — a WAN link between two processes going
//! down and coming back (a Sovereign's NATS leaf link to the hub).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The link's state, shared between the test and its proxy.
#[derive(Clone)]
pub struct Link {
    down: Arc<AtomicBool>,
    cuts: Arc<watch::Sender<u64>>,
}

impl Default for Link {
    fn default() -> Self {
        Self {
            down: Arc::default(),
            cuts: Arc::new(watch::channel(0).0),
        }
    }
}

impl Link {
    /// Every open connection closed, new ones refused.
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Connections accepted again.
    pub fn mend(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// Serves the proxy to `upstream_port` on a free loopback port, for as long as
/// the calling runtime runs; its port.
pub async fn proxy(upstream_port: u16, link: Link) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let port = listener.local_addr().expect("bound").port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            if link.down.load(Ordering::SeqCst) {
                continue; // dropped: refused
            }
            let mut cuts = link.cuts.subscribe();
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = cuts.changed() => {}
                }
            });
        }
    });
    port
}
