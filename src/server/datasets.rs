//! The server's datasets: the datasets root, downloads and uploads, and the sweeper of
//! unfinished uploads.

use std::sync::Arc;

use tracing::info;

use super::ServeArgs;
use crate::datasets::{upload::Uploads, Datasets, DownloadSource};

pub(super) fn datasets(args: &ServeArgs) -> Datasets {
    Datasets {
        root: args.datasets_root.clone(),
        allow_download: args.allow_download,
        cifar10: DownloadSource {
            url: args.cifar10_url.clone(),
            md5: args.cifar10_md5.clone(),
        },
        cifar100: DownloadSource {
            url: args.cifar100_url.clone(),
            md5: args.cifar100_md5.clone(),
        },
        uploads: Arc::new(
            args.uploads
                .uploads(&args.data_dir)
                .with_s3(args.artifacts.clone()),
        ),
    }
}

/// Removes unfinished uploads nobody continued within the TTL, and fetched datasets past
/// `--dataset-cache-bytes`: at start, then every tenth of the TTL (at least every minute).
pub(super) fn sweep_uploads(uploads: Arc<Uploads>) {
    let every = (uploads.ttl / 10).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let u = uploads.clone();
            let swept = tokio::task::spawn_blocking(move || {
                (u.sweep(), u.fetched.sweep(std::time::SystemTime::now()))
            });
            if let Ok((stale, evicted)) = swept.await {
                if stale > 0 {
                    info!(
                        removed = stale,
                        "unfinished uploads past --upload-ttl removed"
                    );
                }
                if evicted > 0 {
                    info!(
                        removed = evicted,
                        "fetched datasets past --dataset-cache-bytes removed"
                    );
                }
            }
        }
    });
}
