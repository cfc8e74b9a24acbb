//! Thin adapter: a thread that ends removed backends' sockets off the Services sync loop.
//! The walk over every network namespace ([`super::socket_termination`]) costs about 1 to
//! 3 ms per namespace (each dump walks the kernel's whole TCP table, shared by all
//! namespaces), seconds on a node with a thousand pods; the loop must not wait for it to
//! write the next change. The maps are written first either way, so new connections
//! already avoid a removed backend; only the ending of old sockets comes later.
//!
//! Removals queued while a round runs are merged into the next one, and a pair whose
//! backend is back in its frontend's list by then is dropped from it (a socket connected
//! to it since must not end).
use std::path::Path;
use std::sync::mpsc;

use super::stale_sockets::RemovedBackends;
use super::tables::{ServiceTables, ServiceTablesError};

#[derive(Debug, thiserror::Error)]
pub enum SocketTerminatorError {
    #[error(transparent)]
    Tables(#[from] ServiceTablesError),
    #[error("cannot start the socket termination thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What one round ended: sockets destroyed, and namespaces or sockets that failed.
pub type RoundReport = (usize, usize);

/// The thread's queue; the thread ends once this is dropped and its queue is drained.
pub struct SocketTerminator {
    queue: mpsc::Sender<RemovedBackends>,
}

impl SocketTerminator {
    /// Opens the Services maps under `root` for the thread (its own handles) and starts it;
    /// `report` is called after each round.
    pub fn start(
        root: &Path,
        report: impl Fn(RoundReport) + Send + 'static,
    ) -> Result<SocketTerminator, SocketTerminatorError> {
        let mut tables = ServiceTables::open(root)?;
        let (queue, queued) = mpsc::channel::<RemovedBackends>();
        std::thread::Builder::new()
            .name("socket-termination".into())
            .spawn(move || {
                while let Ok(mut removed) = queued.recv() {
                    while let Ok(more) = queued.try_recv() {
                        removed.merge(more);
                    }
                    match round(&mut tables, &removed) {
                        Ok(outcome) => report(outcome),
                        Err(e) => {
                            log::warn!("services: ending stale sockets: {e}");
                            report((0, 1));
                        }
                    }
                }
            })
            .map_err(SocketTerminatorError::Thread)?;
        Ok(SocketTerminator { queue })
    }

    /// Queues the sockets of `removed` to be ended (nothing when it is empty).
    pub fn end(&self, removed: RemovedBackends) {
        if removed.is_empty() {
            return;
        }
        // The thread lives as long as the sender; a send fails only if it panicked.
        if self.queue.send(removed).is_err() {
            log::warn!("services: the socket termination thread is gone");
        }
    }
}

fn round(
    tables: &mut ServiceTables,
    removed: &RemovedBackends,
) -> Result<RoundReport, ServiceTablesError> {
    let removed = removed.still_removed(&tables.frontends()?);
    tables.end_sockets(&removed)
}
