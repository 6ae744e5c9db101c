//! Dataset requests resolved against a datasets root made here.

use std::fs;
use std::path::Path;

use super::*;

fn datasets(root: &Path, allow_download: bool) -> Datasets {
    let source = |url: &str| DownloadSource {
        url: url.into(),
        md5: String::new(),
    };
    Datasets {
        root: root.to_path_buf(),
        allow_download,
        cifar10: source(CIFAR10_URL),
        cifar100: source(CIFAR100_URL),
        uploads: std::sync::Arc::new(upload::Uploads::new(
            root,
            upload::Limits {
                bytes: 1 << 30,
                entries: 1000,
            },
            0,
            std::time::Duration::from_secs(3600),
        )),
    }
}

/// The message of an INVALID_ARGUMENT, or a panic naming what came instead.
fn invalid(r: Result<ResolvedDataset, ApiError>) -> String {
    match r {
        Err(ApiError::InvalidArgument(m)) => m,
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

fn precondition(r: Result<ResolvedDataset, ApiError>) -> String {
    match r {
        Err(ApiError::FailedPrecondition(m)) => m,
        other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
    }
}

#[test]
fn paths_that_leave_the_root_are_refused_by_field() {
    let root = tempfile::tempdir().unwrap();
    let d = datasets(root.path(), true);
    for path in ["../cifar", "a/../../b", "/etc", "a/../b"] {
        let m = invalid(d.resolve("cifar10", path));
        assert!(
            m.starts_with("dataset.path: ") && m.contains("escapes"),
            "{path}: {m}"
        );
    }
    let m = invalid(d.resolve("cifar10", ""));
    assert!(m.starts_with("dataset.path: is empty"), "{m}");
    let m = invalid(d.resolve("mnist", "x"));
    assert!(m.starts_with("dataset.format: "), "{m}");
    // The format is checked first: both fields wrong names the format.
    assert!(invalid(d.resolve("mnist", "../x")).starts_with("dataset.format: "));
}

#[test]
fn a_link_out_of_the_root_is_refused_and_one_inside_it_is_followed() {
    let (root, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    fs::write(outside.path().join("data_batch_1.bin"), b"").unwrap();
    std::os::unix::fs::symlink(outside.path(), root.path().join("out")).unwrap();
    let d = datasets(root.path(), false);
    let m = invalid(d.resolve("cifar10", "out"));
    assert!(m.contains("through a link"), "{m}");

    fs::create_dir(root.path().join("real")).unwrap();
    fs::write(root.path().join("real/data_batch_1.bin"), b"").unwrap();
    std::os::unix::fs::symlink(root.path().join("real"), root.path().join("alias")).unwrap();
    let r = d.resolve("cifar10", "./alias").unwrap();
    assert_eq!((r.num_classes, r.needs_download), (10, false));
    assert_eq!(r.spec.path, root.path().join("./alias"));
}

#[test]
fn missing_cifar_is_a_precondition_or_a_download() {
    let root = tempfile::tempdir().unwrap();
    let m = precondition(datasets(root.path(), false).resolve("cifar100", "c100"));
    assert!(
        m.contains("has no train.bin") && m.contains("--allow-download"),
        "{m}"
    );
    let r = datasets(root.path(), true)
        .resolve("cifar100", "c100")
        .unwrap();
    assert_eq!((r.num_classes, r.needs_download), (100, true));
    assert_eq!(r.spec.format, DatasetFormat::Cifar100);
}

#[test]
fn an_image_folder_has_a_class_per_sub_folder_in_either_layout() {
    let root = tempfile::tempdir().unwrap();
    let d = datasets(root.path(), true);
    // Never downloaded: missing or empty is a precondition even with downloads allowed.
    assert!(precondition(d.resolve("image-folder", "pets")).contains("no image folder"));
    fs::create_dir(root.path().join("pets")).unwrap();
    precondition(d.resolve("image-folder", "pets"));

    for class in ["cat", "dog", "fish"] {
        fs::create_dir(root.path().join("pets").join(class)).unwrap();
    }
    fs::write(root.path().join("pets/README.txt"), b"not a class").unwrap();
    let r = d.resolve("image-folder", "pets").unwrap();
    assert_eq!((r.num_classes, r.needs_download), (3, false));

    // With train/ and test/, the classes are train/'s.
    for dir in ["split/train/a", "split/train/b", "split/test/a"] {
        fs::create_dir_all(root.path().join(dir)).unwrap();
    }
    assert_eq!(d.resolve("image-folder", "split").unwrap().num_classes, 2);
}
