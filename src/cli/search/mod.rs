//! `tlb search`: start, watch (a live table fed by WatchSearch), show, list and cancel
//! hyper-parameter searches on a server; and the search plot of `tlb plot --search`.

use std::io::IsTerminal;

use anyhow::Result;
use clap::{Args, Subcommand};

mod show;

use super::client::{dataset_arg, runtime, status_err, Conn, ServerArg};
use super::connect::channel;
use crate::proto::v1 as pb;
use crate::proto::v1::search_service_client::SearchServiceClient;
pub use show::plot;
use show::{event_line, headline, search_state, table};

#[derive(Args, Debug)]
pub struct SearchArgs {
    #[command(subcommand)]
    pub command: SearchCommand,
}

#[derive(Subcommand, Debug)]
pub enum SearchCommand {
    /// Start a search (StartSearch) and follow it with a live table (--detach: just the id).
    Start(StartArgs),
    /// Follow a search with a live table until it ends.
    Watch(SearchId),
    /// Show a search: its trials, their rungs and figures, the best one.
    Show(SearchId),
    /// List the server's searches.
    Ls(ListArgs),
    /// Cancel a running search and its trials.
    Cancel(SearchId),
}

#[derive(Args, Debug)]
pub struct StartArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// reference, cpu-small or tiny: every trial starts from it.
    #[arg(long, default_value = "cpu-small")]
    pub preset: String,
    #[arg(long, default_value = "cifar10")]
    pub format: String,
    /// As for `tlb train`: a folder under the server's datasets root, or a local one
    /// (uploaded first).
    #[arg(long)]
    pub dataset: String,
    /// What trials vary, e.g. 'lr=log_uniform(1e-4,3e-3) chunk_size=[4,8,16] r=[1,2]'
    /// (domains: [a,b,…], uniform(lo,hi), log_uniform(lo,hi), int(lo,hi)).
    #[arg(long)]
    pub space: String,
    /// Every point of the grid once.
    #[arg(long, conflicts_with_all = ["asha", "random"])]
    pub grid: bool,
    /// Random draws (the default).
    #[arg(long, conflicts_with = "asha")]
    pub random: bool,
    /// Asynchronous successive halving: trials stop early at rungs of min·ηᵏ epochs unless
    /// they are among the best 1/η there.
    #[arg(long)]
    pub asha: bool,
    #[arg(long, requires = "asha")]
    pub min_epochs: Option<u32>,
    /// The last rung (ASHA); default: the preset's epochs.
    #[arg(long, requires = "asha")]
    pub max_epochs: Option<u32>,
    #[arg(long, requires = "asha")]
    pub eta: Option<u32>,
    #[arg(long, requires = "asha")]
    pub brackets: Option<u32>,
    /// Trials in all (default: the grid's size, or 16).
    #[arg(long)]
    pub max_trials: Option<u32>,
    /// Trials queued or running at once (default 2).
    #[arg(long)]
    pub max_concurrent: Option<u32>,
    /// val_accuracy (default) or val_loss.
    #[arg(long)]
    pub metric: Option<crate::engine::search::Metric>,
    /// max or min (default: the metric's).
    #[arg(long)]
    pub mode: Option<crate::engine::search::Mode>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Each trial's epochs (grid, random).
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Each trial's time budget in minutes (grid, random).
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Print the search id and return.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Args, Debug)]
pub struct SearchId {
    #[command(flatten)]
    pub server: ServerArg,
    pub search_id: String,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub server: ServerArg,
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

pub fn run(a: SearchArgs) -> Result<()> {
    runtime()?.block_on(async {
        match a.command {
            SearchCommand::Start(a) => start(a).await,
            SearchCommand::Watch(a) => watch(&mut client(&a.server).await?, &a.search_id).await,
            SearchCommand::Show(a) => {
                let s = get(&mut client(&a.server).await?, &a.search_id).await?;
                print!("{}", table(&s));
                Ok(())
            }
            SearchCommand::Ls(a) => list(a).await,
            SearchCommand::Cancel(a) => {
                let s = client(&a.server)
                    .await?
                    .cancel_search(pb::CancelSearchRequest {
                        search_id: a.search_id,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                print!("{}", table(&s));
                Ok(())
            }
        }
    })
}

pub(super) async fn client(server: &ServerArg) -> Result<SearchServiceClient<Conn>> {
    Ok(SearchServiceClient::new(channel(server).await?))
}

pub(super) async fn get(client: &mut SearchServiceClient<Conn>, id: &str) -> Result<pb::Search> {
    Ok(client
        .get_search(pb::GetSearchRequest {
            search_id: id.to_string(),
        })
        .await
        .map_err(status_err)?
        .into_inner())
}

async fn start(a: StartArgs) -> Result<()> {
    use crate::engine::search::{Metric, Mode};
    let dataset = dataset_arg(&a.server, &a.dataset, &a.format).await?;
    let algorithm = match (a.grid, a.asha) {
        (true, _) => pb::SearchAlgorithm::Grid,
        (_, true) => pb::SearchAlgorithm::Asha,
        _ => pb::SearchAlgorithm::Random,
    };
    let request = pb::StartSearchRequest {
        preset: a.preset,
        config: Some(pb::TrainingConfig {
            epochs: a.epochs,
            max_minutes: a.max_minutes,
            ..Default::default()
        }),
        dataset: Some(dataset),
        space: a.space,
        algorithm: algorithm as i32,
        max_trials: a.max_trials.unwrap_or(0),
        max_concurrent: a.max_concurrent.unwrap_or(0),
        metric: match a.metric {
            None => pb::SearchMetric::Unspecified,
            Some(Metric::ValAccuracy) => pb::SearchMetric::ValAccuracy,
            Some(Metric::ValLoss) => pb::SearchMetric::ValLoss,
        } as i32,
        mode: match a.mode {
            None => pb::SearchMode::Unspecified,
            Some(Mode::Max) => pb::SearchMode::Max,
            Some(Mode::Min) => pb::SearchMode::Min,
        } as i32,
        seed: a.seed,
        asha: a.asha.then(|| pb::AshaSettings {
            min_epochs: a.min_epochs.unwrap_or(0),
            max_epochs: a.max_epochs.unwrap_or(0),
            eta: a.eta.unwrap_or(0),
            brackets: a.brackets.unwrap_or(0),
        }),
    };
    let mut client = client(&a.server).await?;
    let id = client
        .start_search(request)
        .await
        .map_err(status_err)?
        .into_inner()
        .search_id;
    println!("{id}");
    if a.detach {
        return Ok(());
    }
    watch(&mut client, &id).await
}

/// Follows the search: on a terminal, its table redrawn at every event; otherwise one line
/// per event. Errors when the search does not succeed.
async fn watch(client: &mut SearchServiceClient<Conn>, id: &str) -> Result<()> {
    use pb::search_event::Kind;
    let mut stream = client
        .watch_search(pb::WatchSearchRequest {
            search_id: id.to_string(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let live = std::io::stderr().is_terminal();
    let mut drawn = 0usize;
    let mut last = None;
    while let Some(e) = stream.message().await.map_err(status_err)? {
        let kind = Kind::try_from(e.kind).unwrap_or(Kind::Unspecified);
        if live {
            let s = match &e.search {
                Some(s) => s.clone(),
                None => get(client, id).await?,
            };
            let text = table(&s);
            if drawn > 0 {
                // Back to the table's first line, and clear below.
                eprint!("\x1b[{drawn}F\x1b[J");
            }
            eprint!("{text}");
            drawn = text.lines().count();
            last = Some(s);
        } else if kind == Kind::SearchState {
            eprintln!("{}", headline(e.search.as_ref().expect("the search")));
        } else {
            eprintln!("{}", event_line(&e));
        }
        if kind == Kind::SearchEnded {
            last = e.search.or(last);
        }
    }
    let s = match last {
        Some(s) => s,
        None => get(client, id).await?,
    };
    if !live {
        print!("{}", table(&s));
    }
    anyhow::ensure!(
        s.state == pb::SearchState::Succeeded as i32,
        "search {id} ended {}{}",
        search_state(s.state),
        if s.error.is_empty() {
            String::new()
        } else {
            format!(": {}", s.error)
        }
    );
    Ok(())
}

async fn list(a: ListArgs) -> Result<()> {
    let listed = client(&a.server)
        .await?
        .list_searches(pb::ListSearchesRequest {
            page_size: a.limit,
            page_token: String::new(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    for s in &listed.searches {
        println!("{}", headline(s));
    }
    Ok(())
}
