//! Follows one job live, the way the web app's Server-Sent Events endpoint should: subscribe,
//! replay the list, then apply events past what was replayed ([`Follower`]). Prints each output
//! line once, in order, and every status change; stops at a terminal status.
//!
//! ```console
//! $ cargo run -p repobox-contract --example follow_job -- redis://127.0.0.1:6379 a1b2c3d4e5f6
//! ```

use std::error::Error;

use futures::StreamExt;
use redis::AsyncCommands;
use repobox_contract::events::{Event, Follower, Step};
use repobox_contract::{JobStatus, keys};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(job_id)) = (args.next(), args.next()) else {
        return Err("usage: follow_job REDIS_URL JOB_ID".into());
    };
    let client = redis::Client::open(url)?;

    // 1. Subscribe first: from now on no event is missed...
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(keys::job_events(&job_id)).await?;
    // 2. ...then read the history; events already in it are skipped by their `seq`.
    let mut con = client.get_multiplexed_async_connection().await?;
    let history: Vec<String> = con.lrange(keys::job_output(&job_id), 0, -1).await?;
    let status: Option<String> = con.hget(keys::job(&job_id), "status").await?;
    let status = status.as_deref().and_then(JobStatus::parse);
    for line in &history {
        println!("{line}");
    }
    println!(
        "==> status: {}",
        status.map_or("unknown", JobStatus::as_str)
    );
    if status.is_some_and(JobStatus::is_terminal) {
        return Ok(());
    }

    // 3. Apply events.
    let mut follower = Follower::new(history.len() as u64, status);
    let mut messages = pubsub.into_on_message();
    while let Some(msg) = messages.next().await {
        let event = Event::parse(&msg.get_payload::<String>()?)?;
        loop {
            match follower.apply(&event) {
                Step::Lines(lines) => lines.iter().for_each(|l| println!("{l}")),
                Step::Status(s, fields) => {
                    println!("==> status: {s} {fields:?}");
                    if s.is_terminal() {
                        return Ok(());
                    }
                }
                Step::Skip => {}
                // Messages were lost (a slow subscriber): the list has them.
                Step::Gap { from, to } => {
                    let missed: Vec<String> = con
                        .lrange(keys::job_output(&job_id), from as isize, to as isize - 1)
                        .await?;
                    missed.iter().for_each(|l| println!("{l}"));
                    follower.read(missed.len() as u64);
                    if missed.is_empty() {
                        return Err("the output list ends before the event's seq".into());
                    }
                    continue;
                }
            }
            break;
        }
    }
    Ok(())
}
