use crate::common;

use std::sync::Arc;

use tlb::engine::data::{
    read_image_folder, read_test, read_train, Augmenter, CifarKind, DataError, DatasetFormat,
    DatasetSpec, EpochPlan, ImageSet, Loader, Split, PIXELS,
};

#[test]
fn cifar10_reader_reads_records_and_names() {
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_cifar(dir.path(), 50, 20);
    let train = read_train(dir.path(), CifarKind::Cifar10).unwrap();
    assert_eq!(train.len(), 50);
    assert_eq!(train.side, 32);
    assert_eq!(train.class_names[1], "automobile");
    let (imgs, labels) = common::synthetic_images(50, 1);
    assert_eq!(train.image(7), &imgs[7][..]);
    assert_eq!(train.labels[7] as u8, labels[7]);
    assert_eq!(read_test(dir.path(), CifarKind::Cifar10).unwrap().len(), 20);
}

#[test]
fn cifar10_splits_are_the_reference_ones() {
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_cifar(dir.path(), 100, 10);
    let splits = DatasetSpec {
        format: DatasetFormat::Cifar10,
        path: dir.path().into(),
    }
    .load()
    .unwrap();
    assert_eq!(splits.train.range, 0..80);
    assert_eq!(
        splits.val.range,
        80..100,
        "validation is the tail of the training files"
    );
    assert_eq!(splits.test.unwrap().len(), 10);
}

#[test]
fn truncated_and_corrupt_cifar_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_cifar(dir.path(), 10, 5);
    let f = dir.path().join("data_batch_1.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let err = read_train(dir.path(), CifarKind::Cifar10).unwrap_err();
    assert!(matches!(err, DataError::BadSize { .. }), "{err}");
    assert!(err.to_string().contains("data_batch_1.bin"), "{err}");

    let mut bad = bytes.clone();
    bad[3073 * 4] = 11; // label of record 4
    std::fs::write(&f, &bad).unwrap();
    let err = read_train(dir.path(), CifarKind::Cifar10).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::BadLabel {
                index: 4,
                label: 11,
                ..
            }
        ),
        "{err}"
    );

    std::fs::write(&f, []).unwrap();
    assert!(matches!(
        read_train(dir.path(), CifarKind::Cifar10).unwrap_err(),
        DataError::BadSize { .. }
    ));

    std::fs::remove_file(&f).unwrap();
    let err = read_train(dir.path(), CifarKind::Cifar10).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("data_batch_1.bin"), "{err}");
    std::fs::remove_file(dir.path().join("test_batch.bin")).unwrap();
    assert!(read_test(dir.path(), CifarKind::Cifar10)
        .unwrap_err()
        .to_string()
        .contains("test_batch.bin"));
}

#[test]
fn cifar100_uses_the_fine_label() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    for i in 0..6u8 {
        bytes.push(i % 20); // coarse
        bytes.push(i * 15); // fine, up to 75
        bytes.extend(std::iter::repeat_n(i, PIXELS));
    }
    std::fs::write(dir.path().join("train.bin"), &bytes).unwrap();
    let set = read_train(dir.path(), CifarKind::Cifar100).unwrap();
    assert_eq!(set.labels, vec![0, 15, 30, 45, 60, 75]);
    assert_eq!(set.num_classes(), 100);
    bytes[1] = 100;
    std::fs::write(dir.path().join("train.bin"), &bytes).unwrap();
    assert!(matches!(
        read_train(dir.path(), CifarKind::Cifar100).unwrap_err(),
        DataError::BadLabel { .. }
    ));
}

#[test]
fn image_folder_reads_classes_and_rejects_corrupt_images() {
    let dir = tempfile::tempdir().unwrap();
    for (class, color) in [("cats", [200u8, 10, 10]), ("dogs", [10, 200, 10])] {
        std::fs::create_dir_all(dir.path().join(class)).unwrap();
        for i in 0..3 {
            let img = image::RgbImage::from_pixel(40 + i, 30, image::Rgb(color));
            img.save(dir.path().join(class).join(format!("{i}.png")))
                .unwrap();
        }
    }
    std::fs::write(dir.path().join("cats/readme.txt"), "not an image").unwrap();
    let set = read_image_folder(dir.path(), 32).unwrap();
    assert_eq!(set.class_names, vec!["cats", "dogs"]);
    assert_eq!(set.len(), 6);
    assert_eq!(set.labels, vec![0, 0, 0, 1, 1, 1]);
    // planar: the red plane of a red image is bright, the green plane dark
    assert!(set.image(0)[0] > 190 && set.image(0)[1024] < 20);
    let detected = DatasetSpec::detect(dir.path());
    assert_eq!(detected.format, DatasetFormat::ImageFolder);
    assert_eq!(
        detected.load().unwrap().train.len() + detected.load().unwrap().val.len(),
        6
    );

    std::fs::write(dir.path().join("dogs/broken.png"), b"\x89PNG garbage").unwrap();
    let err = read_image_folder(dir.path(), 32).unwrap_err();
    assert!(
        matches!(err, DataError::Decode { .. }) && err.to_string().contains("broken.png"),
        "{err}"
    );
}

fn ramp_set(n: usize) -> Split {
    let mut pixels = Vec::new();
    for i in 0..n {
        pixels.extend((0..PIXELS).map(|p| ((p * 7 + i * 13) % 256) as u8));
    }
    Split::whole(Arc::new(ImageSet {
        side: 32,
        pixels,
        labels: (0..n as u16).map(|i| i % 10).collect(),
        class_names: (0..10).map(|i| i.to_string()).collect(),
    }))
}

#[test]
fn augmentation_is_deterministic_for_a_seed() {
    let split = ramp_set(40);
    let plan = |seed, epoch| EpochPlan {
        batch_size: 16,
        image_size: 48,
        train: true,
        seed,
        epoch,
    };
    let a: Vec<_> = Loader::new(split.clone(), plan(5, 0), 0, 1, 2).collect();
    let b: Vec<_> = Loader::new(split.clone(), plan(5, 0), 0, 2, 4).collect();
    assert_eq!(a.len(), 3);
    assert_eq!(a[2].len(), 8);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            x.images, y.images,
            "worker count must not change the batches"
        );
        assert_eq!(x.labels, y.labels);
    }
    let c: Vec<_> = Loader::new(split.clone(), plan(6, 0), 0, 1, 2).collect();
    let d: Vec<_> = Loader::new(split.clone(), plan(5, 1), 0, 1, 2).collect();
    assert_ne!(a[0].images, c[0].images, "another seed gives other batches");
    assert_ne!(
        a[0].labels, d[0].labels,
        "another epoch gives another order"
    );
    // resuming mid-epoch yields the same remaining batches
    let tail: Vec<_> = Loader::new(split, plan(5, 0), 1, 1, 2).collect();
    assert_eq!(tail.len(), 2);
    assert_eq!(tail[0].images, a[1].images);
    assert!(a[0].images.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn eval_resize_is_identity_at_the_same_size_and_flip_mirrors() {
    let split = ramp_set(1);
    let (img, _) = split.get(0);
    let aug = Augmenter::new(32, 32, false);
    let mut out = vec![0f32; aug.out_len()];
    aug.apply(
        img,
        aug.draw(&mut rand::rngs::StdRng::seed_from_u64(0)),
        &mut out,
    );
    for (o, &i) in out.iter().zip(img) {
        assert!((o - i as f32 / 255.0).abs() < 1e-6);
    }
    // a crop of the 36-pixel resize, mirrored, equals the unmirrored crop read backwards
    let train = Augmenter::new(32, 32, true);
    let mut plain = vec![0f32; train.out_len()];
    let mut flipped = vec![0f32; train.out_len()];
    let cf = tlb::engine::data::CropFlip {
        top: 2,
        left: 3,
        flip: false,
    };
    train.apply(img, cf, &mut plain);
    train.apply(
        img,
        tlb::engine::data::CropFlip { flip: true, ..cf },
        &mut flipped,
    );
    for y in 0..32 {
        for x in 0..32 {
            assert_eq!(plain[y * 32 + x], flipped[y * 32 + 31 - x]);
        }
    }
}

use rand::SeedableRng;
