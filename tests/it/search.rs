//! SearchService through the real server: an ASHA search of the `tiny` preset on the real
//! cifar10-mini (promotions checked against the rule on the metrics the trials reported,
//! the budget, the result served under the search's id), bad specs, a cancelled search; and
//! with two replicas on PostgreSQL, a search that survives kill -9 of a replica.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::postgres::Postgres;
use common::server::{encoded, get_job, metric_epochs, png, Server};
use tlb::proto::v1 as pb;
use tlb::proto::v1::search_event::Kind;
use tlb::proto::v1::search_service_client::SearchServiceClient;
use tonic::transport::Channel;

use crate::replicas::{replica_command, shared_data};

/// 9 configurations of `tiny` (a grid of 3 × 3), ASHA η = 3 over 1, 3 and 9 epochs.
fn asha_request(max_concurrent: u32) -> pb::StartSearchRequest {
    pb::StartSearchRequest {
        preset: "tiny".into(),
        dataset: Some(pb::Dataset {
            format: "cifar10".into(),
            path: "cifar10-mini".into(),
            ..Default::default()
        }),
        space: "lr=[1e-3, 3e-3, 1e-2] chunk_size=[2,4,8]".into(),
        algorithm: pb::SearchAlgorithm::Asha as i32,
        max_trials: 9,
        max_concurrent,
        asha: Some(pb::AshaSettings {
            min_epochs: 1,
            max_epochs: 9,
            eta: 3,
            brackets: 1,
        }),
        ..Default::default()
    }
}

/// The epochs ASHA may train for 9 trials over rungs 1, 3, 9: 9·1 + 3·2 + 1·6.
const BUDGET: u32 = 21;

async fn get_search(client: &mut SearchServiceClient<Channel>, id: &str) -> pb::Search {
    client
        .get_search(pb::GetSearchRequest {
            search_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn start(client: &mut SearchServiceClient<Channel>, r: pb::StartSearchRequest) -> String {
    client.start_search(r).await.unwrap().into_inner().search_id
}

/// WatchSearch until the search ends (bounded by `timeout`).
async fn watch_to_end(
    client: &mut SearchServiceClient<Channel>,
    id: &str,
    timeout: Duration,
) -> Vec<pb::SearchEvent> {
    let mut stream = client
        .watch_search(pb::WatchSearchRequest {
            search_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let collect = async {
        let mut events = Vec::new();
        while let Some(e) = stream.message().await.unwrap() {
            events.push(e);
        }
        events
    };
    tokio::time::timeout(timeout, collect)
        .await
        .expect("the search did not end in time")
}

/// Replays the event log through the ASHA rule: every promotion out of rung k went to a
/// trial among the best ⌊n/η⌋ of the n reports at rung k logged before it (ties to the
/// lower trial), never beyond the synchronous count ⌊N/η^(k+1)⌋, and at the end exactly that
/// many; each trial started, and each promotion made, once. Returns the promotions per rung.
fn check_asha_log(events: &[pb::SearchEvent], n: u32, eta: u32) -> Vec<usize> {
    let mut reports: HashMap<u32, Vec<(u32, f64)>> = HashMap::new();
    let mut promoted: HashMap<u32, HashSet<u32>> = HashMap::new();
    let mut started = HashSet::new();
    let seqs: Vec<u64> = events.iter().filter(|e| e.seq > 0).map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "a gap or a repeat in the log"
    );
    for e in events {
        let trial = e.trial.unwrap_or(u32::MAX);
        match Kind::try_from(e.kind).unwrap() {
            Kind::TrialStarted => assert!(started.insert(trial), "trial {trial} started twice"),
            Kind::TrialReported => {
                let at = reports.entry(e.rung()).or_default();
                assert!(
                    at.iter().all(|r| r.0 != trial),
                    "trial {trial} reported twice"
                );
                at.push((trial, e.metric.expect("a reported metric")));
            }
            Kind::TrialPromoted => {
                let k = e.rung() - 1;
                let cap = (n / eta.pow(k + 1)) as usize;
                let set = promoted.entry(k).or_default();
                assert!(set.len() < cap, "more than {cap} promoted from rung {k}");
                assert!(
                    set.insert(trial),
                    "trial {trial} promoted twice from rung {k}"
                );
                let mut at = reports.get(&k).cloned().unwrap_or_default();
                at.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let top: Vec<u32> = at
                    .iter()
                    .take(at.len() / eta as usize)
                    .map(|r| r.0)
                    .collect();
                assert!(
                    top.contains(&trial),
                    "trial {trial} promoted from rung {k}, not in the top {top:?} of {at:?}"
                );
            }
            _ => {}
        }
    }
    assert_eq!(started.len() as u32, n);
    let rungs = reports.keys().max().copied().unwrap_or(0);
    (0..rungs)
        .map(|k| promoted.get(&k).map_or(0, HashSet::len))
        .collect()
}

fn kinds(events: &[pb::SearchEvent]) -> Vec<Kind> {
    events
        .iter()
        .map(|e| Kind::try_from(e.kind).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asha_search_promotes_by_the_rule_within_its_budget_and_serves_its_best_trial() {
    let dir = tempfile::tempdir().unwrap();
    // The real data, not the test's folder.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tlb"));
    cmd.args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--datasets-root")
        .arg(shared_data())
        .env("TLB_THREADS", "1")
        .env("RUST_LOG", "warn");
    let server = Server::spawn(cmd, dir.path());
    let mut search = server.search().await;
    let mut training = server.training().await;
    let id = start(&mut search, asha_request(2)).await;
    let events = watch_to_end(&mut search, &id, Duration::from_secs(900)).await;
    let k = kinds(&events);
    assert_eq!(k[0], Kind::SearchState);
    assert_eq!(*k.last().unwrap(), Kind::SearchEnded);
    assert_eq!(check_asha_log(&events, 9, 3), [3, 1]);

    let s = get_search(&mut search, &id).await;
    assert_eq!(s.state, pb::SearchState::Succeeded as i32, "{s:?}");
    assert_eq!((s.trials_total, s.trials_started), (9, 9));
    assert_eq!(s.rungs, [1, 3, 9]);
    assert_eq!(s.epochs_budget, BUDGET);
    let trained: u32 = s.trials.iter().map(|t| t.epochs_completed).sum();
    assert_eq!(trained, s.epochs_trained);
    assert!(trained <= BUDGET, "{trained} epochs > {BUDGET}");
    // The result: the one trial at the top rung, with the figure it reported there.
    let top: Vec<&pb::Trial> = s.trials.iter().filter(|t| t.rung == 2).collect();
    assert_eq!(top.len(), 1);
    assert_eq!(s.best_job_id, top[0].job_id);
    assert_eq!(s.best_epochs, 9);
    assert_eq!(top[0].state, pb::JobState::Succeeded as i32);
    assert_eq!(
        s.best_metric,
        top[0].reports.iter().find(|r| r.rung == 2).unwrap().metric
    );
    // Trials are jobs: waiting ones ended STOPPED with their checkpoints; promoted ones were
    // resumed (a new attempt), not trained again: each epoch once in their metrics.
    for t in &s.trials {
        let job = get_job(&mut training, &t.job_id).await;
        assert_eq!(
            (job.search_id.as_str(), job.trial),
            (id.as_str(), Some(t.trial))
        );
        assert!(
            job.config_json.contains("\"epochs\":9"),
            "{}",
            job.config_json
        );
        let want_epochs = [1, 3, 9][t.rung as usize];
        assert_eq!(job.epochs_completed, want_epochs, "{t:?}");
        let want = if t.rung == 2 {
            pb::JobState::Succeeded
        } else {
            pb::JobState::Stopped
        };
        assert_eq!(job.state, want as i32, "{t:?}");
        assert!(
            job.attempt > t.rung,
            "trial {}: attempt {}",
            t.trial,
            job.attempt
        );
        let epochs = metric_epochs(dir.path(), &t.job_id);
        assert_eq!(
            epochs,
            (1..=u64::from(want_epochs)).collect::<Vec<_>>(),
            "{t:?}"
        );
        let ckpts = training
            .list_checkpoints(pb::ListCheckpointsRequest {
                job_id: t.job_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!ckpts.checkpoints.is_empty());
    }
    // The search's id is a model name: its best trial's.
    let mut inference = server.inference().await;
    let classify = |model: &str| pb::ClassifyRequest {
        model: model.into(),
        images: vec![encoded(png(32, 5))],
        top_k: 3,
    };
    let by_search = inference
        .classify(classify(&id))
        .await
        .unwrap()
        .into_inner();
    let by_job = inference
        .classify(classify(&s.best_job_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_search, by_job);
    let listed = search
        .list_searches(pb::ListSearchesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.searches.len(), 1);
    assert_eq!(listed.searches[0].best_job_id, s.best_job_id);
}

fn grid_request(space: &str) -> pb::StartSearchRequest {
    pb::StartSearchRequest {
        preset: "tiny".into(),
        dataset: Some(pb::Dataset {
            format: "cifar10".into(),
            path: "synth".into(),
            ..Default::default()
        }),
        space: space.into(),
        algorithm: pb::SearchAlgorithm::Grid as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_refused_naming_the_field_and_nothing_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_cifar(&dir.path().join("datasets/synth"), 200, 50);
    let server = Server::start(dir.path(), &[]);
    let mut search = server.search().await;
    let asha = |min_epochs, max_epochs, eta, brackets| {
        let mut r = grid_request("lr=log_uniform(1e-4,1e-2)");
        r.algorithm = pb::SearchAlgorithm::Asha as i32;
        r.asha = Some(pb::AshaSettings {
            min_epochs,
            max_epochs,
            eta,
            brackets,
        });
        r
    };
    let mut too_many = grid_request("r=[1,2] chunk_size=[2,4,8]");
    too_many.max_trials = 5;
    let mut asha_on_grid = grid_request("r=[1,2]");
    asha_on_grid.asha = Some(pb::AshaSettings::default());
    let mut no_dataset = grid_request("r=[1,2]");
    no_dataset.dataset = None;
    let mut bad_preset = grid_request("bogus=[1]");
    bad_preset.preset = "huge".into();
    let cases = [
        (grid_request(""), "space"),
        (grid_request("bogus=[1,2]"), "space.bogus"),
        (grid_request("lr=uniform(0.01,0.001)"), "space.lr"),
        (grid_request("lr=log_uniform(0,0.1)"), "space.lr"),
        (grid_request("r=int(2,2)"), "space.r"),
        (grid_request("r=[]"), "space.r"),
        (grid_request("lr=uniform(0.001,0.01)"), "space.lr"),
        (grid_request("patch_size=[4,64]"), "space.patch_size"),
        (too_many, "max_trials"),
        (asha_on_grid, "asha"),
        // 0 means the default (1 epoch): a first rung at the last is no search.
        (asha(0, 1, 3, 1), "asha.max_epochs"),
        (asha(3, 2, 3, 1), "asha.max_epochs"),
        (asha(1, 9, 1, 1), "asha.eta"),
        (asha(1, 9, 3, 9), "asha.brackets"),
        (no_dataset, "dataset"),
        // The preset is judged before the space.
        (bad_preset, "preset"),
    ];
    for (request, field) in cases {
        let Err(e) = search.start_search(request.clone()).await else {
            panic!("{field}: accepted {request:?}");
        };
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{request:?}: {e:?}");
        assert!(
            e.message().starts_with(&format!("{field}: ")),
            "{field}: {}",
            e.message()
        );
    }
    let listed = search
        .list_searches(pb::ListSearchesRequest::default())
        .await
        .unwrap();
    assert!(listed.into_inner().searches.is_empty());
    let jobs = server
        .training()
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap();
    assert!(jobs.into_inner().jobs.is_empty());
    let missing = search
        .get_search(pb::GetSearchRequest {
            search_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let bad_id = search
        .get_search(pb::GetSearchRequest {
            search_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_id.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_cancelled_while_trials_run_cancels_them_all() {
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_cifar(&dir.path().join("datasets/synth"), 2000, 50);
    let server = Server::start(dir.path(), &[]);
    let mut search = server.search().await;
    let mut training = server.training().await;
    let mut r = grid_request("lr=[1e-3,2e-3,3e-3,4e-3]");
    r.config = Some(pb::TrainingConfig {
        epochs: Some(200),
        ..Default::default()
    });
    r.max_concurrent = 2;
    let id = start(&mut search, r).await;
    // Two trials queued at once (max_concurrent), one of them running on the one device.
    let deadline = Instant::now() + Duration::from_secs(120);
    let running = loop {
        let s = get_search(&mut search, &id).await;
        assert_eq!(s.trials_started, 2, "{s:?}");
        if let Some(t) = s
            .trials
            .iter()
            .find(|t| t.state == pb::JobState::Running as i32)
        {
            let job = get_job(&mut training, &t.job_id).await;
            if job.epochs_completed >= 1 {
                break t.job_id.clone();
            }
        }
        assert!(Instant::now() < deadline, "no trial ran: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let s = search
        .cancel_search(pb::CancelSearchRequest {
            search_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, pb::SearchState::Cancelled as i32);
    let events = watch_to_end(&mut search, &id, Duration::from_secs(30)).await;
    assert_eq!(*kinds(&events).last().unwrap(), Kind::SearchEnded);
    let again = search
        .cancel_search(pb::CancelSearchRequest {
            search_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    // Every trial ends cancelled; the running one checkpointed first; no new trial starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = get_search(&mut search, &id).await;
        assert_eq!(s.trials_started, 2);
        if s.trials
            .iter()
            .all(|t| t.state == pb::JobState::Cancelled as i32)
        {
            break;
        }
        assert!(Instant::now() < deadline, "trials still going: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ckpts = training
        .list_checkpoints(pb::ListCheckpointsRequest { job_id: running })
        .await
        .unwrap()
        .into_inner();
    assert!(!ckpts.checkpoints.is_empty());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = get_search(&mut search, &id).await;
    assert_eq!(
        (s.trials_started, s.state),
        (2, pb::SearchState::Cancelled as i32)
    );
}

/// Two replicas on PostgreSQL run an ASHA search; the replica running a trial is killed
/// (-9) once the search has promoted: the other one finishes the search, each trial started
/// once, each promotion made once and by the rule, within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_survives_kill_9_of_a_replica_without_a_trial_or_promotion_twice() {
    let Some(pg) = Postgres::start() else { return };
    let root = tempfile::tempdir().unwrap();
    let datasets = shared_data();
    let url = pg.url.clone();
    let mut servers: Vec<Server> = ["a", "b"]
        .iter()
        .map(|id| {
            Server::spawn(
                replica_command(root.path(), &datasets, &url, id, &[]),
                root.path(),
            )
        })
        .collect();
    let mut search = servers[0].search().await;
    let mut training = servers[1].training().await;
    // Images of 32 pixels (64 tokens) instead of 16: epochs long enough to be caught running.
    let mut request = asha_request(2);
    request.config = Some(pb::TrainingConfig {
        image_size: Some(32),
        ..Default::default()
    });
    let id = start(&mut search, request).await;
    // Once a promotion has happened, kill the replica running a trial.
    let deadline = Instant::now() + Duration::from_secs(600);
    let victim = loop {
        let s = get_search(&mut search, &id).await;
        let promoted = s.trials.iter().any(|t| t.rung > 0);
        let running = s
            .trials
            .iter()
            .find(|t| t.state == pb::JobState::Running as i32);
        assert_eq!(
            s.state,
            pb::SearchState::Running as i32,
            "ended before the kill: {s:?}"
        );
        if let (true, Some(t)) = (promoted, running) {
            let job = get_job(&mut training, &t.job_id).await;
            if job.state == pb::JobState::Running as i32 && !job.worker.is_empty() {
                break (usize::from(job.worker == "b"), job.job_id);
            }
        }
        assert!(Instant::now() < deadline, "no promotion: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (victim, killed_trial) = victim;
    servers[victim].signal_and_wait("KILL");
    let survivor = &servers[1 - victim];
    let mut search = survivor.search().await;
    let events = watch_to_end(&mut search, &id, Duration::from_secs(900)).await;
    assert_eq!(check_asha_log(&events, 9, 3), [3, 1]);
    let s = get_search(&mut search, &id).await;
    assert_eq!(s.state, pb::SearchState::Succeeded as i32, "{s:?}");
    assert!(
        s.epochs_trained <= BUDGET,
        "{} epochs > {BUDGET}",
        s.epochs_trained
    );
    let jobs = survivor
        .training()
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jobs.jobs.len(), 9, "one job per trial");
    // The trial the kill interrupted was taken over (resumed), not started again.
    let taken = jobs.jobs.iter().find(|j| j.job_id == killed_trial).unwrap();
    assert!(taken.restarts >= 1, "{taken:?}");
    assert_eq!(taken.worker, ["a", "b"][1 - victim]);
    assert!(jobs.jobs.iter().all(|j| [
        pb::JobState::Succeeded as i32,
        pb::JobState::Stopped as i32
    ]
    .contains(&j.state)));
    drop(pg);
}

fn tlb(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tlb"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tlb search start --asha` follows the search to its end (one line per event without a
/// terminal, then the table); `show`, `ls` and `tlb plot --search` read it back; `cancel` of
/// an ended search is refused with the server's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_starts_watches_shows_lists_and_plots_a_search() {
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_cifar(&dir.path().join("datasets/synth"), 300, 50);
    let port = common::free_port();
    let server = Server::start(
        dir.path(),
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    let s = server.addr.as_str();
    let (ok, out, err) = tlb(&[
        "search",
        "start",
        "--server",
        s,
        "--preset",
        "tiny",
        "--dataset",
        "synth",
        "--space",
        "lr=log_uniform(1e-3, 1e-2) r=[1,2]",
        "--asha",
        "--max-epochs",
        "3",
        "--max-trials",
        "6",
        "--max-concurrent",
        "3",
        "--seed",
        "11",
    ]);
    assert!(ok, "{out}\n{err}");
    let id = out.lines().next().unwrap().trim().to_string();
    uuid::Uuid::parse_str(&id).unwrap();
    for says in [
        "trial 0 started: lr=",
        "reported",
        "promoted to rung 1 (3 epochs)",
        "search ended: SUCCEEDED",
    ] {
        assert!(err.contains(says), "{says} missing:\n{err}");
    }
    // The final table: a headline and one row per trial, the best marked.
    assert!(
        out.contains(&format!("search {id}  SUCCEEDED  asha  trials 6/6")),
        "{out}"
    );
    let rows: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("trial  state"))
        .skip(1)
        .collect();
    assert_eq!(rows.len(), 6, "{out}");
    assert_eq!(
        rows.iter().filter(|r| r.ends_with(" *")).count(),
        1,
        "{out}"
    );
    let (ok, shown, err) = tlb(&["search", "show", "--server", s, &id]);
    assert!(ok, "{err}");
    assert_eq!(
        shown,
        out.lines()
            .skip(1)
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    );
    let (ok, listed, _) = tlb(&["search", "ls", "--server", s]);
    assert!(
        ok && listed.starts_with(&format!("search {id}")),
        "{listed}"
    );
    // Trials are jobs: listed by state, each naming its search.
    let (ok, stopped, err) = tlb(&["jobs", "--server", s, "--state", "stopped"]);
    assert!(ok, "{err}");
    assert_eq!(stopped.lines().count(), 4, "{stopped}");
    assert!(
        stopped
            .lines()
            .all(|l| l.contains(&format!(" of search {id}"))),
        "{stopped}"
    );
    let png = dir.path().join("search.png");
    let (ok, _, err) = tlb(&[
        "plot",
        "--server",
        s,
        "--search",
        &id,
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1000, 600));
    // The best trial's curve is drawn in black; the others in grey or colour.
    assert!(img.pixels().filter(|p| p.0 == [0, 0, 0]).count() > 500);
    assert!(img.pixels().any(|p| p.0 == [170, 170, 170]));
    // Prometheus: the trials by state (2 of 6 promoted to the top rung), the promotions.
    let metrics = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    for line in [
        "tlb_search_trials{state=\"SUCCEEDED\"} 2",
        "tlb_search_trials{state=\"STOPPED\"} 4",
        "tlb_search_trials{state=\"RUNNING\"} 0",
        "tlb_search_promotions_total 2",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    let (ok, _, err) = tlb(&["search", "cancel", "--server", s, &id]);
    assert!(
        !ok && err.contains("FailedPrecondition") && err.contains("already ended"),
        "{err}"
    );
}
