use prost::Message;

use super::proto::event::What;
use super::proto::hparams::{h_params_plugin_data::Data, HParamsPluginData};
use super::proto::summary::value::Value as Kind;
use super::*;

#[test]
fn an_event_file_holds_what_was_written_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(dir.path(), "local").unwrap();
    w.scalars(10, &[("step/loss", 2.5), ("step/lr", 1e-3)])
        .unwrap();
    w.image(20, "attention/x", vec![1, 2, 3], 4, 2).unwrap();
    w.session_start(5).unwrap();
    let path = w.path().to_path_buf();
    drop(w);
    assert_eq!(event_files(dir.path()), std::slice::from_ref(&path));
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with("events.out.tfevents.") && name.ends_with(".local"),
        "{name}"
    );

    let events = read_events(&path).unwrap();
    assert_eq!(events.len(), 4);
    assert_eq!(
        events[0].what,
        Some(What::FileVersion("brain.Event:2".into()))
    );
    let Some(What::Summary(s)) = &events[1].what else {
        panic!("{:?}", events[1])
    };
    assert_eq!(events[1].step, 10);
    let scalars: Vec<(&str, Option<&Kind>)> = s
        .value
        .iter()
        .map(|v| (v.tag.as_str(), v.value.as_ref()))
        .collect();
    assert_eq!(
        scalars,
        [
            ("step/loss", Some(&Kind::SimpleValue(2.5))),
            ("step/lr", Some(&Kind::SimpleValue(1e-3))),
        ]
    );
    let Some(What::Summary(s)) = &events[2].what else {
        panic!("{:?}", events[2])
    };
    let Some(Kind::Image(image)) = &s.value[0].value else {
        panic!("{s:?}")
    };
    assert_eq!((image.width, image.height, image.colorspace), (4, 2, 3));
    assert_eq!(image.encoded_image_string, [1, 2, 3]);
    let Some(What::SessionLog(log)) = &events[3].what else {
        panic!("{:?}", events[3])
    };
    assert_eq!((events[3].step, log.status), (5, 1));
}

#[test]
fn hyper_parameters_are_the_configs_fields_in_the_hparams_plugins_format() {
    let config = crate::engine::train::Preset::CpuSmall.config();
    let hp = hparams_of(&config);
    let number = |name: &str| match hp[name].kind {
        Some(prost_types::value::Kind::NumberValue(n)) => n,
        ref k => panic!("{name}: {k:?}"),
    };
    assert_eq!(number("lr"), config.lr);
    assert_eq!(number("chunk_size"), config.model.chunk_size as f64);
    assert_eq!(number("batch_size"), config.batch_size as f64);
    assert!(matches!(
        hp["readout"].kind,
        Some(prost_types::value::Kind::StringValue(ref s)) if s == "slow"
    ));

    let dir = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(dir.path(), "attempt-1").unwrap();
    w.hparams(hp.clone(), "ckpts").unwrap();
    w.session_end(Status::Success).unwrap();
    let events = read_events(w.path()).unwrap();
    let plugin = |e: &Event| {
        let Some(What::Summary(s)) = &e.what else {
            panic!("{e:?}")
        };
        let v = &s.value[0];
        let data = v.metadata.as_ref().unwrap().plugin_data.as_ref().unwrap();
        assert_eq!(data.plugin_name, "hparams");
        (
            v.tag.clone(),
            HParamsPluginData::decode(&data.content[..]).unwrap(),
        )
    };
    let (tag, start) = plugin(&events[1]);
    assert_eq!(tag, "_hparams_/session_start_info");
    let Some(Data::SessionStartInfo(info)) = start.data else {
        panic!("{start:?}")
    };
    assert_eq!(info.hparams.len(), hp.len());
    assert_eq!(info.hparams["lr"], hp["lr"]);
    assert_eq!(info.model_uri, "ckpts");
    let (tag, end) = plugin(&events[2]);
    assert_eq!(tag, "_hparams_/session_end_info");
    assert!(
        matches!(end.data, Some(Data::SessionEndInfo(e)) if e.status == Status::Success as i32)
    );
}
