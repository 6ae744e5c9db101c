//! `tlb.v1.SearchService`: hyper-parameter searches whose trials are jobs.

mod convert;

use std::pin::Pin;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::info;
use uuid::Uuid;

use super::paging::Page;
use super::training::{admit, base_of};
use super::{may_cancel, AppState};
use crate::auth::Caller;
use crate::error::{parse_uuid, ApiError};
use crate::names::Named;
use crate::proto::v1 as pb;
use crate::proto::v1::search_service_server::SearchService;
use crate::store::{now_ms, EventKind, SearchRow, SearchState, Store};
use crate::worker::search::advance;

/// How often a WatchSearch stream looks for new events.
const WATCH_EVERY: Duration = Duration::from_millis(500);

pub struct SearchApi(pub AppState);

/// The job a model name stands for when it names a search: its best trial's (NOT_FOUND is
/// left to the caller when it names no search; FAILED_PRECONDITION while it has no result).
pub async fn through_search(store: &Store, id: Uuid) -> Result<Uuid, ApiError> {
    match store.get_search(id).await? {
        None => Ok(id),
        Some(s) => s.best.map(|b| b.job_id).ok_or_else(|| {
            ApiError::FailedPrecondition(format!(
                "search {id} has no result yet ({}): no trial has reported a validation figure",
                s.state.name()
            ))
        }),
    }
}

impl SearchApi {
    async fn row(&self, search_id: &str) -> Result<SearchRow, ApiError> {
        let id = parse_uuid("search_id", search_id)?;
        self.0
            .store
            .get_search(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no search with id {id}")))
    }

    /// The search with its trials, their reports and curves.
    async fn message(&self, s: &SearchRow) -> Result<pb::Search, ApiError> {
        let store = &self.0.store;
        let trials = store.search_trials(s.id).await?;
        let detail = convert::Detail {
            reports: store.search_reports(s.id).await?,
            epochs: store.search_epochs(s.id).await?,
        };
        Ok(convert::search(s, &trials, Some(&detail)))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::SearchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl SearchService for SearchApi {
    async fn start_search(
        &self,
        request: Request<pb::StartSearchRequest>,
    ) -> Result<Response<pb::StartSearchResponse>, Status> {
        let caller = Caller::of(&request).cloned();
        let r = request.into_inner();
        let base = base_of(
            &self.0,
            caller.as_ref(),
            &r.preset,
            r.config.as_ref(),
            r.dataset.clone(),
        )
        .await?;
        let (spec, corners) = convert::spec_of(&r, &base.config)?;
        // Only now the state of the machine: arguments are judged first. Each field's
        // extremes must fit it too (a trial of the widest model, say).
        admit(&self.0, &base.config).await?;
        for config in &corners {
            self.0.admission.check(config)?;
        }
        let row = SearchRow {
            id: Uuid::new_v4(),
            state: SearchState::Running,
            preset: base.preset,
            spec,
            base: base.config,
            dataset_format: base.format,
            dataset_path: base.path,
            created_by: caller.map(|c| c.name).unwrap_or_default(),
            created_at_ms: now_ms(),
            finished_at_ms: None,
            best: None,
            error: String::new(),
        };
        let store = &self.0.store;
        store.insert_search(&row).await.map_err(ApiError::from)?;
        info!(search = %row.id, space = %row.spec.space, trials = row.spec.total_trials(), "search started");
        // Its first trials queue now (or at the next sweep, if this fails).
        advance(store, row.id).await;
        self.0.worker.wake();
        Ok(Response::new(pb::StartSearchResponse {
            search_id: row.id.to_string(),
        }))
    }

    async fn get_search(
        &self,
        request: Request<pb::GetSearchRequest>,
    ) -> Result<Response<pb::Search>, Status> {
        let s = self.row(&request.get_ref().search_id).await?;
        Ok(Response::new(self.message(&s).await?))
    }

    async fn list_searches(
        &self,
        request: Request<pb::ListSearchesRequest>,
    ) -> Result<Response<pb::ListSearchesResponse>, Status> {
        let r = request.into_inner();
        let page = Page::of(r.page_size, &r.page_token)?;
        let mut rows = self
            .0
            .store
            .list_searches(page.fetch(), page.after.clone())
            .await
            .map_err(ApiError::from)?;
        let next_page_token = page.cut(&mut rows, |s| (s.created_at_ms, s.id));
        let ids: Vec<Uuid> = rows.iter().map(|s| s.id).collect();
        let mut trials = self.0.store.trials_of(&ids).await.map_err(ApiError::from)?;
        let searches = rows
            .iter()
            .map(|s| convert::search(s, &trials.remove(&s.id).unwrap_or_default(), None))
            .collect();
        Ok(Response::new(pb::ListSearchesResponse {
            searches,
            next_page_token,
        }))
    }

    async fn cancel_search(
        &self,
        request: Request<pb::CancelSearchRequest>,
    ) -> Result<Response<pb::Search>, Status> {
        let s = self.row(&request.get_ref().search_id).await?;
        may_cancel(
            Caller::of(&request),
            ("search", "searches"),
            s.id,
            &s.created_by,
        )?;
        let Some(running) = self
            .0
            .store
            .cancel_search(s.id)
            .await
            .map_err(ApiError::from)?
        else {
            return Err(ApiError::FailedPrecondition(format!(
                "search {} already ended ({}); only a running search can be cancelled",
                s.id,
                s.state.name()
            ))
            .into());
        };
        // Running trials stop within a second wherever they run; here at once.
        for job in &running {
            self.0.stop_here(job);
        }
        info!(search = %s.id, running = running.len(), "search cancelled");
        let s = self.row(&s.id.to_string()).await?;
        Ok(Response::new(self.message(&s).await?))
    }

    type WatchSearchStream = EventStream;

    async fn watch_search(
        &self,
        request: Request<pb::WatchSearchRequest>,
    ) -> Result<Response<Self::WatchSearchStream>, Status> {
        let first = self.row(&request.get_ref().search_id).await?;
        let snapshot = self.message(&first).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let store = self.0.store.clone();
        let mut shutdown = self.0.shutdown.clone();
        let api = SearchApi(self.0.clone());
        tokio::spawn(async move {
            let id = first.id;
            let state = pb::SearchEvent {
                kind: pb::search_event::Kind::SearchState as i32,
                search: Some(snapshot),
                ..Default::default()
            };
            if tx.send(Ok(state)).await.is_err() {
                return;
            }
            let mut seq = 0;
            loop {
                let events = match store.search_events(id, seq).await {
                    Ok(events) => events,
                    Err(e) if e.is_unavailable() => Vec::new(),
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(ApiError::from(e)))).await;
                        return;
                    }
                };
                for e in events {
                    seq = e.seq;
                    let mut message = convert::event(&e);
                    let ended = e.kind == EventKind::SearchEnded;
                    if ended {
                        if let Ok(Some(s)) = store.get_search(id).await {
                            message.search = api.message(&s).await.ok();
                        }
                    }
                    if tx.send(Ok(message)).await.is_err() || ended {
                        return;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_EVERY) => {}
                    _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "server shutting down; watch again after it restarts",
                            )))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
