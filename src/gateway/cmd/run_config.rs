//! `secrets.get` and `config.get`: a run's secrets and config, as the run
//! directory (`--config`) resolves them for its run id now.
//!
//! Owns which secrets a request gets (all, or the ones it names, or
//! `NOT_FOUND` naming the missing) and the shape of both replies. Must not
//! log or copy a secret anywhere but into the reply, nor load or match the
//! directory (`run_config` does).

use std::collections::BTreeMap;

use serde_json::json;

use super::access::session_for;
use super::{ConnCtx, Reply};
use crate::protocol::commands::{
    GetConfigResponse, GetSecretsCommand, GetSecretsResponse, SessionRef,
};
use crate::protocol::{CommandError, CommandKind, ErrorCode};

/// `secrets.get`.
pub(crate) fn secrets_get(
    ctx: &ConnCtx,
    id: &str,
    req: GetSecretsCommand,
) -> Result<Reply, CommandError> {
    session_for(ctx, CommandKind::SecretsGet, &req.session_id, &req.run_id)?;
    let resolved = ctx.shared.runs.current().resolve(&req.run_id);
    let secrets: BTreeMap<&str, &str> = match &req.names {
        None => resolved
            .secrets
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect(),
        Some(names) => {
            let missing: Vec<&str> = names
                .iter()
                .filter(|n| !resolved.secrets.contains_key(n.as_str()))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(
                    CommandError::new(ErrorCode::NotFound, "no such secret for this run")
                        .with_details(json!({ "missing": missing })),
                );
            }
            names
                .iter()
                .filter_map(|n| resolved.secrets.get_key_value(n.as_str()))
                .map(|(k, v)| (k.as_str(), v.expose()))
                .collect()
        }
    };
    let secrets = secrets
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    Ok(Reply::now(id, &GetSecretsResponse { secrets }))
}

/// `config.get`.
pub(crate) fn config_get(ctx: &ConnCtx, id: &str, req: SessionRef) -> Result<Reply, CommandError> {
    session_for(ctx, CommandKind::ConfigGet, &req.session_id, &req.run_id)?;
    let resolved = ctx.shared.runs.current().resolve(&req.run_id);
    Ok(Reply::now(
        id,
        &GetConfigResponse {
            config: std::borrow::Cow::Borrowed(&resolved.config),
        },
    ))
}
