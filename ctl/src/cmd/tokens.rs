//! `accelctl tokens create|list|revoke`: bearer tokens for the TCP listener, created at run
//! time (operators only). A token is printed once, when created.

use accel_runtime::api::types::{CreatedToken, TokenList};
use clap::Subcommand;
use hyper::Method;

use crate::client::{Client, CtlError};
use crate::output;

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a token for a tenant and print it (it cannot be shown again).
    Create {
        /// The tenant the token authenticates as.
        tenant: String,
    },
    /// List tokens (ids, tenants, hashes; never the tokens).
    List {
        /// Only this tenant's.
        tenant: Option<String>,
    },
    /// Revoke a token by id, or every token of a tenant.
    Revoke {
        /// A token id (`tok_...`) or a tenant name.
        id_or_tenant: String,
    },
}

pub async fn run(client: &Client, command: &TokensCommand, json: bool) -> Result<(), CtlError> {
    match command {
        TokensCommand::Create { tenant } => {
            let (created, raw): (CreatedToken, _) = client
                .post_json("/v1/tokens", &serde_json::json!({ "tenant": tenant }))
                .await?;
            if json {
                println!("{}", output::json(&raw));
            } else {
                println!("{}", created.token);
                eprintln!(
                    "token {} for tenant {}: keep it now, it is not shown again",
                    created.id, created.tenant
                );
            }
        }
        TokensCommand::List { tenant } => {
            let (mut list, raw): (TokenList, _) = client.get_json("/v1/tokens").await?;
            if let Some(t) = tenant {
                list.data.retain(|e| &e.tenant == t);
            }
            if json {
                let raw = if tenant.is_some() {
                    serde_json::to_value(&list).unwrap_or(raw)
                } else {
                    raw
                };
                println!("{}", output::json(&raw));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .data
                .iter()
                .map(|e| {
                    vec![
                        e.id.clone(),
                        e.tenant.clone(),
                        e.sha256.chars().take(16).collect(),
                        e.created_at.to_string(),
                        e.created_by.clone(),
                    ]
                })
                .collect();
            println!(
                "{}",
                output::table(&["ID", "TENANT", "SHA256", "CREATED", "BY"], &rows)
            );
        }
        TokensCommand::Revoke { id_or_tenant } => {
            let ids: Vec<String> = if id_or_tenant.starts_with("tok_") {
                vec![id_or_tenant.clone()]
            } else {
                let (list, _): (TokenList, _) = client.get_json("/v1/tokens").await?;
                let ids: Vec<String> = list
                    .data
                    .into_iter()
                    .filter(|e| &e.tenant == id_or_tenant)
                    .map(|e| e.id)
                    .collect();
                if ids.is_empty() {
                    return Err(CtlError::Usage(format!(
                        "no token has id or tenant {id_or_tenant:?}; see `accelctl tokens list`"
                    )));
                }
                ids
            };
            for id in &ids {
                client
                    .request(Method::DELETE, &format!("/v1/tokens/{id}"), None)
                    .await?;
                if !json {
                    println!("revoked {id}");
                }
            }
            if json {
                println!("{}", output::json(&serde_json::json!({ "revoked": ids })));
            }
        }
    }
    Ok(())
}
