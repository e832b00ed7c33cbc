//! Building an exact arrival order on one node (issue 16's deterministic scenarios): the node's
//! apply service is not running, the origins' captures have published what they wrote, and
//! `pgferry replay` applies one origin's partition into the node, then the next — through the
//! same stream and writer as apply, recording the same progress, so an apply service started
//! afterwards goes on from there.

use std::time::Duration;

use anyhow::{ensure, Result};

use crate::Cluster;

impl Cluster {
    /// Applies into node `node` everything origin `origin` has published so far (replay from
    /// offset 0 of its partition; what the node already applied is skipped as a duplicate).
    /// The node's apply service must not be running. Waits for `origin`'s capture first.
    pub async fn apply_origin_now(&self, node: usize, origin: usize) -> Result<()> {
        self.wait_published(origin, Duration::from_secs(60)).await?;
        let out = self.pgferry(&[
            "replay",
            "--node",
            &self.nodes[node].name,
            "--origin",
            &self.nodes[origin].name,
            "--from-offset",
            "0",
            "--quiet",
        ])?;
        ensure!(
            out.status.success(),
            "replay of {} into {} failed: {}",
            self.nodes[origin].name,
            self.nodes[node].name,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// [`Cluster::apply_origin_now`] for each of `origins`, in that order.
    pub async fn apply_origins_in_order(&self, node: usize, origins: &[usize]) -> Result<()> {
        for &origin in origins {
            self.apply_origin_now(node, origin).await?;
        }
        Ok(())
    }
}
