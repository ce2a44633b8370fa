//! A TCP proxy in front of the real Postgres that injects the network's
//! worst moments (test code only): a COMMIT whose acknowledgement is lost
//! (it reaches the server and commits; its answer never reaches the client,
//! whose connection is cut), and a partition (every connection cut, new ones
//! refused until it heals).
//!
//! It reads the frontend's messages (after the untyped startup ones: each a
//! type byte and a length) only to spot a simple-query `COMMIT`; everything
//! else passes through unchanged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The faults to inject; shared between the test and its proxy.
#[derive(Clone)]
pub struct PgFaults {
    /// COMMITs still to lose the acknowledgement of.
    armed: Arc<AtomicUsize>,
    lost: Arc<AtomicUsize>,
    /// Refusing new connections (a partition).
    refusing: Arc<AtomicBool>,
    /// Bumped to cut every open connection.
    cuts: Arc<watch::Sender<u64>>,
}

impl Default for PgFaults {
    fn default() -> Self {
        Self {
            armed: Arc::default(),
            lost: Arc::default(),
            refusing: Arc::default(),
            cuts: Arc::new(watch::channel(0).0),
        }
    }
}

impl PgFaults {
    /// The next `n` COMMITs commit, and their clients never hear it.
    pub fn lose_next_commits(&self, n: usize) {
        self.armed.store(n, Ordering::SeqCst);
    }

    /// COMMITs whose acknowledgement was lost so far.
    pub fn lost(&self) -> usize {
        self.lost.load(Ordering::SeqCst)
    }

    /// A partition: every open connection is cut, new ones are refused.
    pub fn partition(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// The partition heals: connections are accepted again.
    pub fn heal(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }

    fn take_commit(&self) -> bool {
        self.armed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// Serves the proxy to Postgres on `upstream_port` on a free loopback port,
/// for as long as the calling runtime runs; its port.
pub async fn proxy(upstream_port: u16, faults: PgFaults) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            if faults.refusing.load(Ordering::SeqCst) {
                continue; // dropped: the client sees its connection closed
            }
            let faults = faults.clone();
            tokio::spawn(async move {
                if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await {
                    let mut cut = faults.cuts.subscribe();
                    cut.mark_unchanged();
                    tokio::select! {
                        _ = relay(client, server, &faults) => {}
                        _ = cut.changed() => {}
                    }
                }
            });
        }
    });
    port
}

/// One client connection: the frontend's messages go up one by one; a
/// COMMIT to lose goes up, and then the connection is cut as soon as the
/// server answers, before the answer goes down.
async fn relay(client: TcpStream, server: TcpStream, faults: &PgFaults) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (cut_tx, mut cut_rx) = watch::channel(false);
    let up = async move {
        let mut started = false;
        loop {
            let Ok(message) = next_message(&mut client_read, started).await else {
                return;
            };
            // The untyped startup messages end with the StartupMessage (not an SSLRequest).
            if !started && !is_ssl_request(&message) {
                started = true;
            }
            let commit = message.first() == Some(&b'Q')
                && message.get(5..11) == Some(b"COMMIT".as_slice())
                && faults.take_commit();
            if commit {
                let _ = cut_tx.send(true);
            }
            if server_write.write_all(&message).await.is_err() {
                return;
            }
            if commit {
                faults.lost.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    };
    let down = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let Ok(n) = server_read.read(&mut buffer).await else {
                return;
            };
            if n == 0 || *cut_rx.borrow_and_update() {
                // The end, or the COMMIT's answer: never delivered.
                return;
            }
            if client_write.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    };
    // When either side ends, both connections close.
    tokio::pin!(down);
    tokio::select! {
        _ = up => {
            // Up ended (after a COMMIT to lose): the server's answer ends down.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut down).await;
        }
        _ = &mut down => {}
    }
}

fn is_ssl_request(message: &[u8]) -> bool {
    message.len() == 8 && message[4..8] == [0x04, 0xd2, 0x16, 0x2f]
}

/// The next frontend message, whole: untyped (length first) until the
/// startup is over, typed (a byte, then the length) after.
async fn next_message(
    read: &mut tokio::net::tcp::OwnedReadHalf,
    started: bool,
) -> std::io::Result<Vec<u8>> {
    let mut message = Vec::new();
    if started {
        message.push(read.read_u8().await?);
    }
    let length = read.read_u32().await?;
    message.extend_from_slice(&length.to_be_bytes());
    let mut body = vec![0u8; (length as usize).saturating_sub(4)];
    read.read_exact(&mut body).await?;
    message.extend_from_slice(&body);
    Ok(message)
}
