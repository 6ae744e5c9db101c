use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::engine::train::Preset;

fn spec(space: &str, algorithm: Algorithm, max_trials: u32, max_concurrent: u32) -> SearchSpec {
    SearchSpec {
        space: Space::parse(space).unwrap(),
        algorithm,
        max_trials,
        max_concurrent,
        metric: Metric::ValAccuracy,
        mode: Mode::Max,
        seed: 7,
    }
}

fn asha(min_epochs: u32, max_epochs: u32, eta: u32, brackets: u32) -> Algorithm {
    Algorithm::Asha(Asha {
        min_epochs,
        max_epochs,
        eta,
        brackets,
    })
}

#[test]
fn spaces_parse_as_people_write_them_and_print_back() {
    let s = Space::parse(
        "lr = log_uniform(1e-4, 3e-3)  chunk_size=[4, 8,16], r=choice(1,2); readout=[slow,last-fast] \
         num_layers=int(2,6) ffn_dropout=uniform(0,0.3)",
    )
    .unwrap();
    let fields: Vec<&str> = s.params.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "lr",
            "chunk_size",
            "r",
            "readout",
            "num_layers",
            "ffn_dropout"
        ]
    );
    assert_eq!(s.params[0].domain, Domain::LogUniform(1e-4, 3e-3));
    assert_eq!(s.params[4].domain, Domain::Int(2, 6));
    assert_eq!(Space::parse(&s.to_string()).unwrap(), s);
    // Serialised as its text.
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<Space>(&json).unwrap(), s);
}

#[test]
fn bad_spaces_are_refused_naming_the_field() {
    let cases = [
        ("", "space", "empty"),
        ("lr", "space", "not field=domain"),
        ("foo=[1,2]", "space.foo", "not a searchable field"),
        ("epochs=[1,2]", "space.epochs", "not a searchable field"),
        ("lr=uniform(0.1,0.1)", "space.lr", "lo must be below hi"),
        ("lr=uniform(0.3,0.1)", "space.lr", "lo must be below hi"),
        ("lr=log_uniform(0,0.1)", "space.lr", "lo > 0"),
        ("lr=log_uniform(-1,0.1)", "space.lr", "lo > 0"),
        ("lr=[]", "space.lr", "empty choice"),
        ("lr=normal(0,1)", "space.lr", "unknown domain 'normal'"),
        ("lr=uniform(1)", "space.lr", "two numbers"),
        ("lr=uniform(a,1)", "space.lr", "'a' is not a finite number"),
        ("r=int(3,1)", "space.r", "lo must be below hi"),
        ("r=uniform(1,3)", "space.r", "is an integer"),
        ("r=[1,2.5]", "space.r", "2.5 is not an integer"),
        ("r=[1,1]", "space.r", "in the choice twice"),
        ("lr=[1e-3,fast]", "space.lr", "fast is not a number"),
        (
            "readout=[slow,fast]",
            "space.readout",
            "fast is not one of slow, last-fast",
        ),
        ("readout=uniform(0,1)", "space.readout", "not a range"),
        ("r=[1,2] r=[3]", "space.r", "given twice"),
        ("lr=[0.1", "space.lr", "unclosed"),
    ];
    for (text, field, says) in cases {
        let e = Space::parse(text).unwrap_err();
        assert_eq!(e.field, field, "{text}: {e}");
        assert!(e.message.contains(says), "{text}: {e}");
    }
}

#[test]
fn a_grid_is_complete_without_duplicates_and_bounded_by_max_trials() {
    let s = spec(
        "chunk_size=[4,8,16] r=[1,2] num_layers=int(1,3)",
        Algorithm::Grid,
        18,
        2,
    );
    s.validate().unwrap();
    assert_eq!(s.total_trials(), 18);
    let points: Vec<Assignment> = (0..18).map(|t| s.assignment(t)).collect();
    let distinct: HashSet<String> = points.iter().map(|p| format!("{p:?}")).collect();
    assert_eq!(distinct.len(), 18);
    for c in [4, 8, 16] {
        for r in [1, 2] {
            for l in 1..=3 {
                let want = vec![
                    ("chunk_size".to_string(), Value::Int(c)),
                    ("r".to_string(), Value::Int(r)),
                    ("num_layers".to_string(), Value::Int(l)),
                ];
                assert!(points.contains(&want), "{want:?} missing");
            }
        }
    }
    let small = spec(
        "chunk_size=[4,8,16] r=[1,2] num_layers=int(1,3)",
        Algorithm::Grid,
        17,
        2,
    );
    let e = small.validate().unwrap_err();
    assert_eq!(e.field, "max_trials");
    assert!(e.message.contains("18 points"), "{e}");
    let continuous = spec("r=[1,2] lr=uniform(0.001,0.01)", Algorithm::Grid, 50, 2);
    assert_eq!(continuous.validate().unwrap_err().field, "space.lr");
}

#[test]
fn random_draws_are_reproducible_from_the_seed_and_in_their_ranges() {
    let s = spec(
        "lr=log_uniform(1e-4,1e-2) r=int(1,3) ffn_dropout=uniform(0,0.5)",
        Algorithm::Random,
        50,
        2,
    );
    let draws: Vec<Assignment> = (0..50).map(|t| s.assignment(t)).collect();
    assert_eq!(draws, (0..50).map(|t| s.assignment(t)).collect::<Vec<_>>());
    let mut other = s.clone();
    other.seed = 8;
    assert_ne!(
        draws,
        (0..50).map(|t| other.assignment(t)).collect::<Vec<_>>()
    );
    let (mut low, mut high) = (0, 0);
    for d in &draws {
        let lr = d[0].1.number().unwrap();
        assert!((1e-4..=1e-2).contains(&lr), "{lr}");
        // Log-uniform: as many below the geometric middle (1e-3) as above it, roughly.
        if lr < 1e-3 {
            low += 1
        } else {
            high += 1
        }
        assert!(matches!(d[1].1, Value::Int(1..=3)), "{d:?}");
        assert!((0.0..=0.5).contains(&d[2].1.number().unwrap()));
    }
    assert!(low >= 12 && high >= 12, "{low} below, {high} above 1e-3");
    // A discrete space is drawn without replacement: its 12 points, each once.
    let discrete = spec(
        "lr=[3e-4,1e-3,3e-3] chunk_size=[4,8] r=[1,2]",
        asha(1, 9, 3, 1),
        40,
        2,
    );
    assert_eq!(discrete.total_trials(), 12);
    let seen: HashSet<String> = (0..12)
        .map(|t| format!("{:?}", discrete.assignment(t)))
        .collect();
    assert_eq!(seen.len(), 12);
}

#[test]
fn trial_configs_take_their_values_and_bad_values_are_argument_errors() {
    let base = Preset::Tiny.config();
    let s = spec(
        "lr=[0.01] readout=[last-fast] schedule=[cosine] r=[1]",
        asha(1, 9, 3, 1),
        5,
        1,
    );
    let c = s.trial_config(&base, 0).unwrap();
    assert_eq!(c.lr, 0.01);
    assert_eq!(c.model.readout, crate::engine::model::Readout::LastFast);
    assert_eq!(c.epochs, 9);
    assert_eq!(c.max_minutes, 0.0);
    assert_eq!(s.check_on(&base).unwrap().len(), 4);
    let bad = spec("patch_size=[4,64]", Algorithm::Random, 5, 1);
    let e = bad.check_on(&base).unwrap_err();
    assert_eq!(e.field, "space.patch_size");
    assert!(e.message.contains("64"), "{e}");
}

#[test]
fn asha_rungs_and_its_numbers_are_checked() {
    let a = |min, max, eta, b| Asha {
        min_epochs: min,
        max_epochs: max,
        eta,
        brackets: b,
    };
    assert_eq!(a(1, 9, 3, 1).rungs(0), [1, 3, 9]);
    assert_eq!(a(1, 27, 3, 1).rungs(0), [1, 3, 9, 27]);
    assert_eq!(a(1, 10, 3, 1).rungs(0), [1, 3, 10]);
    assert_eq!(a(2, 9, 3, 1).rungs(0), [2, 9]);
    assert_eq!(a(1, 9, 3, 3).rungs(1), [3, 9]);
    assert_eq!(a(1, 9, 3, 3).rungs(2), [9]);
    let field = |alg| spec("r=[1,2]", alg, 10, 1).validate().unwrap_err().field;
    assert_eq!(field(asha(0, 9, 3, 1)), "asha.min_epochs");
    assert_eq!(field(asha(3, 3, 3, 1)), "asha.max_epochs");
    assert_eq!(field(asha(1, 9, 1, 1)), "asha.eta");
    assert_eq!(field(asha(1, 9, 3, 4)), "asha.brackets");
    assert_eq!(field(asha(1, 9, 3, 0)), "asha.brackets");
    assert_eq!(
        spec("r=[1,2]", Algorithm::Random, 0, 1)
            .validate()
            .unwrap_err()
            .field,
        "max_trials"
    );
    assert_eq!(
        spec("r=[1,2]", Algorithm::Random, 3, 0)
            .validate()
            .unwrap_err()
            .field,
        "max_concurrent"
    );
}

/// The rule written the paper's way, apart from `decide`: rungs as lists of reports and a
/// set of promoted trials per rung; `get_job` from the top rung down.
struct Reference {
    eta: usize,
    rungs: Vec<u32>,
    total: u32,
    reports: Vec<Vec<(u32, f64)>>,
    promoted: Vec<HashSet<u32>>,
    next: u32,
}

impl Reference {
    fn new(eta: usize, rungs: Vec<u32>, total: u32) -> Self {
        let k = rungs.len();
        Self {
            eta,
            rungs,
            total,
            reports: vec![Vec::new(); k],
            promoted: vec![HashSet::new(); k],
            next: 0,
        }
    }

    fn cap(&self, k: usize) -> usize {
        (self.total as usize) / self.eta.pow(k as u32 + 1)
    }

    /// The next job: `(trial, rung)`.
    fn get_job(&mut self) -> Option<(u32, u32)> {
        for k in (0..self.rungs.len() - 1).rev() {
            if self.promoted[k].len() >= self.cap(k) {
                continue;
            }
            let mut sorted = self.reports[k].clone();
            sorted.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
            let top = sorted.len() / self.eta;
            if let Some(&(t, _)) = sorted[..top]
                .iter()
                .find(|(t, _)| !self.promoted[k].contains(t))
            {
                self.promoted[k].insert(t);
                return Some((t, k as u32 + 1));
            }
        }
        (self.next < self.total).then(|| {
            self.next += 1;
            (self.next - 1, 0)
        })
    }
}

/// Runs a search of `n` trials on a pool of `workers`, trials finishing their rungs in an
/// order drawn from `seed` (all at once when `sync`), comparing every decision with the
/// reference; returns the trials' views at the end and the epochs trained.
fn simulate(n: u32, workers: u32, seed: u64, sync: bool) -> (Vec<TrialView>, u32) {
    let s = spec("lr=log_uniform(1e-4,1e-2)", asha(1, 27, 3, 1), n, workers);
    let rungs = vec![1, 3, 9, 27];
    let mut reference = Reference::new(3, rungs.clone(), n);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Each trial's quality; rounded so that ties happen.
    let quality: Vec<f64> = (0..n)
        .map(|_| (rng.random::<f64>() * 10.0).round() / 10.0)
        .collect();
    let mut views: Vec<TrialView> = Vec::new();
    let mut epochs = 0;
    loop {
        let d = decide(&s, &views);
        let mut want = Vec::new();
        for _ in 0..d.promote.len() + d.start.len() {
            want.push(reference.get_job().expect("the reference has a job too"));
        }
        let got: Vec<(u32, u32)> = d
            .promote
            .iter()
            .copied()
            .chain(d.start.iter().map(|&t| (t, 0)))
            .collect();
        assert_eq!(got, want, "seed {seed}: decide and the reference differ");
        for &(t, to) in &d.promote {
            let v = views.iter_mut().find(|v| v.trial == t).unwrap();
            assert_eq!((v.status, v.rung + 1), (Status::Paused, to));
            v.rung = to;
            v.status = Status::Active;
        }
        for &t in &d.start {
            views.push(TrialView {
                trial: t,
                rung: 0,
                status: Status::Active,
                reports: Vec::new(),
            });
        }
        if d.finished {
            assert_eq!(reference.get_job(), None);
            return (views, epochs);
        }
        let active: Vec<usize> = (0..views.len())
            .filter(|&i| views[i].status == Status::Active)
            .collect();
        assert!(!active.is_empty(), "seed {seed}: stalled");
        let finishing = if sync {
            active
        } else {
            vec![active[rng.random_range(0..active.len())]]
        };
        for i in finishing {
            let v = &mut views[i];
            let k = v.rung as usize;
            epochs += rungs[k] - if k == 0 { 0 } else { rungs[k - 1] };
            let metric = quality[v.trial as usize] + 0.01 * k as f64;
            v.reports.push((v.rung, metric));
            reference.reports[k].push((v.trial, metric));
            v.status = if k + 1 == rungs.len() {
                Status::Done
            } else {
                Status::Paused
            };
        }
    }
}

fn promoted_from(views: &[TrialView], k: u32) -> usize {
    views.iter().filter(|v| v.rung > k).count()
}

#[test]
fn asha_promotes_9_3_1_of_27_as_the_reference_does_in_any_arrival_order() {
    // Synchronous: every rung fully reported before deciding.
    let budget = 27 + 9 * 2 + 3 * 6 + 18;
    let (views, epochs) = simulate(27, 27, 1, true);
    assert_eq!([0, 1, 2].map(|k| promoted_from(&views, k)), [9, 3, 1]);
    assert_eq!(epochs, budget);
    // The top trial is the best of the 3 at rung 2, by the reported metric.
    let s = spec("lr=log_uniform(1e-4,1e-2)", asha(1, 27, 3, 1), 27, 27);
    let (trial, rung, _) = best(&s, &views).unwrap();
    assert_eq!(rung, 3);
    assert_eq!(
        views.iter().find(|v| v.trial == trial).unwrap().status,
        Status::Done
    );
    // Asynchronous, in many orders and pool sizes: the same counts at the end, never more
    // epochs than the synchronous budget.
    for seed in 0..40 {
        let workers = 1 + (seed % 7) as u32;
        let (views, epochs) = simulate(27, workers, 100 + seed, false);
        assert_eq!(
            [0, 1, 2].map(|k| promoted_from(&views, k)),
            [9, 3, 1],
            "seed {seed}"
        );
        assert!(epochs <= budget, "seed {seed}: {epochs} epochs > {budget}");
        assert!(views.iter().all(|v| v.status != Status::Active));
    }
}

#[test]
fn the_best_trial_is_the_best_at_the_deepest_rung_and_ties_go_to_the_lower_trial() {
    let s = spec("lr=log_uniform(1e-4,1e-2)", asha(1, 9, 3, 1), 9, 3);
    let view = |trial, reports: Vec<(u32, f64)>| TrialView {
        trial,
        rung: reports.len() as u32 - 1,
        status: Status::Paused,
        reports,
    };
    let trials = vec![
        view(0, vec![(0, 0.9)]),
        view(1, vec![(0, 0.5), (1, 0.6)]),
        view(2, vec![(0, 0.55), (1, 0.6)]),
    ];
    // Trial 0 reports more, but only at rung 0: 1 and 2 tie at rung 1, 1 wins.
    assert_eq!(best(&s, &trials), Some((1, 1, 0.6)));
    let mut min = s.clone();
    min.mode = Mode::Min;
    assert_eq!(best(&min, &trials), Some((1, 1, 0.6)));
    let flat = spec("r=[1,2,3]", Algorithm::Grid, 3, 3);
    assert_eq!(best(&flat, &trials), Some((0, 0, 0.9)));
    let mut flat_min = flat.clone();
    flat_min.mode = Mode::Min;
    assert_eq!(best(&flat_min, &trials), Some((1, 0, 0.5)));
}

#[test]
fn grid_and_random_searches_keep_max_concurrent_trials_going_and_end() {
    let s = spec("r=[1,2,3,4,5]", Algorithm::Grid, 5, 2);
    let d = decide(&s, &[]);
    assert_eq!((d.start.clone(), d.finished), (vec![0, 1], false));
    let mut views: Vec<TrialView> = d
        .start
        .iter()
        .map(|&t| TrialView {
            trial: t,
            rung: 0,
            status: Status::Active,
            reports: vec![],
        })
        .collect();
    views[0].status = Status::Ended; // failed: its slot frees
    assert_eq!(decide(&s, &views).start, [2]);
    let done: Vec<TrialView> = (0..5)
        .map(|t| TrialView {
            trial: t,
            rung: 0,
            status: Status::Done,
            reports: vec![(0, f64::from(t))],
        })
        .collect();
    let d = decide(&s, &done);
    assert!(d.finished && d.start.is_empty() && d.promote.is_empty());
}

#[test]
fn values_are_described_to_5_significant_digits_and_the_budget_is_synchronous_halvings() {
    let v = vec![
        ("lr".to_string(), Value::Float(0.003048860203201793)),
        ("ffn_dropout".to_string(), Value::Float(0.2)),
        ("r".to_string(), Value::Int(2)),
        ("readout".to_string(), Value::Word("slow".into())),
    ];
    assert_eq!(
        describe(&v),
        "lr=0.0030489 ffn_dropout=0.2 r=2 readout=slow"
    );
    let s = |alg, n| spec("lr=log_uniform(1e-4,1e-2)", alg, n, 2);
    assert_eq!(s(asha(1, 27, 3, 1), 27).budget_epochs(27), 81);
    assert_eq!(s(asha(1, 9, 3, 1), 9).budget_epochs(9), 21);
    // Two brackets: trials 0,2,4,… over 1,3,9; trials 1,3,5,… over 3,9.
    // (⌊3/9⌋ = 0 of bracket 0 reach its top rung.)
    assert_eq!(
        s(asha(1, 9, 3, 2), 6).budget_epochs(9),
        (3 + 2) + (3 * 3 + 6)
    );
    assert_eq!(s(Algorithm::Random, 5).budget_epochs(7), 35);
}
