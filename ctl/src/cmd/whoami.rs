//! `accelctl whoami`: how the daemon sees the caller.

use accel_runtime::api::types::WhoAmI;
use accel_runtime::policy::Role;

use crate::client::{Client, CtlError};
use crate::output;

pub async fn run(client: &Client, json: bool) -> Result<(), CtlError> {
    let (me, raw): (WhoAmI, _) = client.get_json("/v1/whoami").await?;
    if json {
        println!("{}", output::json(&raw));
        return Ok(());
    }
    let role = match (me.role, &me.tenant, me.acting_for_tenant) {
        (Role::Operator, Some(t), true) => format!("operator, acting for tenant {t}"),
        (Role::Operator, _, _) => "operator".to_owned(),
        (Role::Tenant, Some(t), _) => format!("tenant {t}"),
        (Role::Tenant, None, _) => "tenant".to_owned(),
    };
    println!(
        "{}",
        output::fields(&[
            ("uid", output::limit(me.uid)),
            ("gid", output::limit(me.gid)),
            ("pid", output::limit(me.pid)),
            ("role", role),
            ("matched by", me.matched_by),
        ])
    );
    Ok(())
}
