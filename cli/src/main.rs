//! `ham`: the command line for `hamd`, a thin shell over the `ham` client library.

mod output;

/// Calls an API method through the retrying client: the request is cloned for each try.
macro_rules! call {
    ($client:expr, $method:ident, $req:expr) => {{
        let req = $req;
        $client
            .call(move |mut api| {
                let req = req.clone();
                Box::pin(async move { api.$method(req).await })
            })
            .await?
    }};
}

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use ham::{Client, Subscription};
use ham_proto as pb;
use std::path::PathBuf;
use std::time::Duration;
use tokio_stream::StreamExt;

/// Control a ham node: entities, conditions, actions, events.
#[derive(Parser, Debug)]
#[command(name = "ham", version, about)]
struct Cli {
    /// The control socket of the local hamd.
    #[arg(long, env = "HAM_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// Print machine-readable JSON (read commands).
    #[arg(long, global = true)]
    json: bool,
    /// Run the command on node NAME of the mesh, through the local hamd
    /// (`all` with `events`: every node).
    #[arg(long, global = true, value_name = "NAME")]
    node: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum CertCmd {
    /// Create a cluster CA: DIR/ca.crt and DIR/ca.key.
    InitCa {
        /// Where to write it.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue node NODE's certificate and key (DIR/NODE.crt, DIR/NODE.key), signed by
    /// the CA in DIR.
    Issue {
        /// The node's name (a DNS label, as `hamd --name`).
        node: String,
        /// Where the CA is and the files go.
        #[arg(long)]
        dir: PathBuf,
    },
}

fn cert(c: &CertCmd) -> anyhow::Result<()> {
    match c {
        CertCmd::InitCa { dir } => {
            let (crt, key) = ham_overlay::identity::init_ca(dir)?;
            println!("wrote {} and {}", crt.display(), key.display());
        }
        CertCmd::Issue { node, dir } => {
            let name = ham_overlay::NodeName::new(node.clone())?;
            let (crt, key) = ham_overlay::identity::issue(dir, &name)?;
            println!("wrote {} and {}", crt.display(), key.display());
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show every entity (a /proc/ham-like table), or one entity in detail.
    Status {
        /// One entity to describe with its conditions and actions.
        name: Option<String>,
    },
    /// Add, attach, remove, stop and start entities.
    #[command(subcommand)]
    Entity(EntityCmd),
    /// Restart an entity (stop it if it runs, start it again; clears a failed state).
    Restart {
        /// The entity.
        name: String,
    },
    /// Add or remove conditions.
    #[command(subcommand)]
    Condition(ConditionCmd),
    /// Add or remove actions.
    #[command(subcommand)]
    Action(ActionCmd),
    /// Show events; --follow keeps streaming new ones.
    Events {
        /// Keep the stream open.
        #[arg(long, short)]
        follow: bool,
        /// Only events of this entity (repeatable).
        #[arg(long)]
        entity: Vec<String>,
        /// Only events of this kind (repeatable), e.g. death, restart, action-failed.
        #[arg(long)]
        kind: Vec<String>,
        /// Replay from this sequence number (default: everything still buffered).
        #[arg(long)]
        from: Option<u64>,
        /// Only events whose topic NODE/ENTITY/KIND matches (`*` matches anything),
        /// e.g. "*/web/*" or "*/*/node-down".
        #[arg(long)]
        topic: Option<String>,
    },
    /// The mesh's members: state, address, round-trip time, last contact.
    Nodes,
    /// Make the cluster CA and node certificates (no hamd needed).
    #[command(subcommand)]
    Cert(CertCmd),
    /// Report a detector's event about an entity (fires `raise` conditions).
    Raise {
        /// The entity.
        name: String,
        /// The message.
        #[arg(required_unless_present = "stdin")]
        message: Option<String>,
        /// The severity.
        #[arg(long, default_value_t = 0)]
        severity: u32,
        /// Raise once per line of standard input (the line is the message), over one
        /// stream: for piping a detector's output in at a high rate.
        #[arg(long, conflicts_with = "message")]
        stdin: bool,
    },
    /// Set an entity's user state (fires `state` conditions).
    State {
        /// The entity.
        name: String,
        /// The new state.
        state: String,
    },
    /// Send one heartbeat for an entity through the API.
    Heartbeat {
        /// The entity.
        name: String,
    },
    /// Re-read hamd's config file and apply it, all or nothing.
    Reload,
    /// Stop hamd (the Guardian, then the HAM). Entities keep running unless asked.
    Stop {
        /// Stop every entity's process too.
        #[arg(long)]
        kill_entities: bool,
    },
    /// Change hamd's log filter (error, warn, info, debug, trace, or a RUST_LOG filter).
    Verbose {
        /// The level or filter.
        level: String,
    },
}

#[derive(Subcommand, Debug)]
enum EntityCmd {
    /// Start a command and monitor it: ham entity add NAME [--restart] -- COMMAND [ARGS…]
    Add {
        /// The entity's name.
        name: String,
        #[command(flatten)]
        opts: EntityOpts,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Monitor a running process by PID.
    Attach {
        /// The entity's name.
        name: String,
        /// The process.
        #[arg(long)]
        pid: i32,
        #[command(flatten)]
        opts: EntityOpts,
        /// A command a restart action runs in its place (optional).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Add a global entity: a name with no process, for detector-raised conditions.
    Global {
        /// The entity's name.
        name: String,
    },
    /// Watch an entity of another mesh node from here: its events there fire this
    /// entity's conditions here (add them with `ham condition add`).
    Remote {
        /// The entity's name here.
        name: String,
        /// The entity there, as ENTITY@NODE (e.g. web@b).
        target: String,
    },
    /// Remove an entity (stops a started entity's process unless --keep-running).
    Rm {
        /// The entity.
        name: String,
        /// Leave its process running.
        #[arg(long)]
        keep_running: bool,
    },
    /// Stop an entity's process; nothing restarts it.
    Stop {
        /// The entity.
        name: String,
    },
    /// Start a stopped, dead or failed entity.
    Start {
        /// The entity.
        name: String,
    },
    /// Restart an entity.
    Restart {
        /// The entity.
        name: String,
    },
}

#[derive(Args, Debug)]
struct EntityOpts {
    /// On death, restart it (adds a `death` condition with a `restart` action).
    #[arg(long)]
    restart: bool,
    /// Restart intensity: at most N restarts …
    #[arg(long, requires = "within")]
    max_restarts: Option<u32>,
    /// … within this window (e.g. 10s); the next restart fails instead.
    #[arg(long, value_parser = parse_duration)]
    within: Option<Duration>,
    /// Exponential backoff between restarts, starting at this delay.
    #[arg(long, value_parser = parse_duration)]
    backoff: Option<Duration>,
    /// Cap of the backoff.
    #[arg(long, value_parser = parse_duration)]
    backoff_max: Option<Duration>,
    /// Heartbeat period (the entity must beat at least this often).
    #[arg(long, value_parser = parse_duration)]
    heartbeat: Option<Duration>,
    /// Missed periods before heartbeat-missed-low.
    #[arg(long, default_value_t = 1)]
    low: u32,
    /// Missed periods before heartbeat-missed-high (default: low).
    #[arg(long)]
    high: Option<u32>,
    /// Environment variable for the command, KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory for the command.
    #[arg(long)]
    cwd: Option<String>,
}

#[derive(Subcommand, Debug)]
enum ConditionCmd {
    /// Add a condition to an entity.
    Add {
        /// The entity.
        entity: String,
        /// The condition's name.
        name: String,
        /// What it reacts to: death, abnormal-death, detach, attach, restart,
        /// heartbeat-missed-low, heartbeat-missed-high, raise, state, any.
        #[arg(long)]
        on: String,
        /// Prune it when the entity is restarted (QNX without HREARMAFTERRESTART).
        #[arg(long)]
        one_shot: bool,
        /// Fast lane; may hold no waitfor.
        #[arg(long)]
        no_wait: bool,
        /// Own lane: its delays hold up nothing else.
        #[arg(long)]
        independent: bool,
        /// For raise: minimum severity.
        #[arg(long, default_value_t = 0)]
        severity: u32,
        /// For state: only transitions from this state.
        #[arg(long)]
        from: Option<String>,
        /// For state: only transitions to this state.
        #[arg(long)]
        to: Option<String>,
        /// For node-down / node-up: only this node.
        #[arg(long = "of-node", value_name = "NAME")]
        node: Option<String>,
    },
    /// Remove a condition.
    Rm {
        /// The entity.
        entity: String,
        /// The condition.
        name: String,
    },
}

// Parsed once per run: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum ActionCmd {
    /// Add an action at the end of a condition's list.
    Add {
        /// The entity.
        entity: String,
        /// The condition.
        condition: String,
        /// restart, execute, notify, signal, waitfor, heartbeat-healthy or log.
        kind: String,
        /// The action's name (default: its kind).
        #[arg(long)]
        name: Option<String>,
        /// Wait this long before each run.
        #[arg(long, value_parser = parse_duration)]
        delay: Option<Duration>,
        /// Run it this many times.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// If it fails, skip the rest of the condition's actions.
        #[arg(long)]
        break_on_fail: bool,
        /// Remove it from the condition if it fails (QNX's default).
        #[arg(long)]
        remove_on_fail: bool,
        /// Also run it once now.
        #[arg(long)]
        do_now: bool,
        /// notify / log: the message.
        #[arg(long)]
        message: Option<String>,
        /// log: error, warn, info or debug.
        #[arg(long, default_value = "info")]
        level: String,
        /// signal: the signal (name or number).
        #[arg(long)]
        signal: Option<String>,
        /// signal: a PID to signal (default: the entity's process).
        #[arg(long)]
        pid: Option<i32>,
        /// signal: another entity's process to signal.
        #[arg(long = "target")]
        target: Option<String>,
        /// waitfor: the path.
        #[arg(long)]
        path: Option<String>,
        /// waitfor: the timeout.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// execute: the command.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Remove an action.
    Rm {
        /// The entity.
        entity: String,
        /// The condition.
        condition: String,
        /// The action.
        name: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (write e.g. 500ms, 10s)"))
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        // One line: the innermost cause says what went wrong.
        let msg = match e.downcast_ref::<ham::ClientError>() {
            Some(ham::ClientError::Status(s)) => {
                format!("{}: {}", output::code_name(s.code()), s.message())
            }
            _ => format!("{e:#}"),
        };
        eprintln!("ham: {}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}

fn entity_def(name: String, opts: EntityOpts, kind: pb::entity_def::Kind) -> pb::EntityDef {
    let mut conditions = Vec::new();
    if opts.restart {
        conditions.push(pb::ConditionDef {
            name: "restart-on-death".into(),
            kind: "death".into(),
            actions: vec![pb::ActionDef {
                name: "restart".into(),
                kind: Some(pb::action_def::Kind::Restart(pb::Empty {})),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    pb::EntityDef {
        name,
        kind: Some(kind),
        heartbeat: opts.heartbeat.map(|p| pb::HeartbeatDef {
            period_ms: ms(p),
            low: opts.low,
            high: opts.high.unwrap_or(opts.low),
        }),
        restart_policy: Some(pb::RestartPolicy {
            max_restarts: opts.max_restarts.unwrap_or(0),
            window_ms: opts.within.map_or(0, ms),
            backoff_initial_ms: opts.backoff.map_or(0, ms),
            backoff_max_ms: opts.backoff_max.map_or(0, ms),
        }),
        conditions,
        ..Default::default()
    }
}

fn command_line(argv: Vec<String>, opts: &EntityOpts) -> pb::CommandLine {
    pb::CommandLine {
        argv,
        env: opts.env.iter().cloned().collect(),
        cwd: opts.cwd.clone().unwrap_or_default(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(ham_proto::defaults::socket_path);
    if let Cmd::Cert(c) = &cli.cmd {
        return cert(c);
    }
    let all_nodes = cli.node.as_deref() == Some("all");
    if all_nodes && !matches!(cli.cmd, Cmd::Events { .. }) {
        bail!("--node all works with `events`; name one node for other commands");
    }
    let mut client = Client::connect(&socket).await?;
    if !all_nodes {
        client.set_target(cli.node.as_deref())?;
    }
    let json = cli.json;
    let name_ref = |name: String| pb::EntityRef { name };
    match cli.cmd {
        Cmd::Status { name: None } => output::status(&client.status().await?, json),
        Cmd::Status { name: Some(name) } => {
            let d = call!(client, describe, name_ref(name));
            output::describe(&d, json)
        }
        Cmd::Entity(cmd) => entity(&mut client, cmd).await?,
        Cmd::Restart { name } => {
            call!(client, restart, name_ref(name));
        }
        Cmd::Condition(ConditionCmd::Add {
            entity,
            name,
            on,
            one_shot,
            no_wait,
            independent,
            severity,
            from,
            to,
            node,
        }) => {
            let condition = pb::ConditionDef {
                name,
                kind: on,
                rearm: Some(!one_shot),
                no_wait,
                independent,
                min_severity: severity,
                from_state: from.unwrap_or_default(),
                to_state: to.unwrap_or_default(),
                actions: Vec::new(),
                node: node.unwrap_or_default(),
            };
            call!(
                client,
                add_condition,
                pb::AddConditionRequest {
                    entity,
                    condition: Some(condition),
                }
            );
        }
        Cmd::Condition(ConditionCmd::Rm { entity, name }) => {
            call!(
                client,
                remove_condition,
                pb::RemoveConditionRequest {
                    entity,
                    condition: name,
                }
            );
        }
        Cmd::Action(ActionCmd::Rm {
            entity,
            condition,
            name,
        }) => {
            call!(
                client,
                remove_action,
                pb::RemoveActionRequest {
                    entity,
                    condition,
                    action: name,
                }
            );
        }
        Cmd::Action(add) => action_add(&mut client, add).await?,
        Cmd::Events {
            follow,
            entity,
            kind,
            from,
            topic,
        } => {
            let mut stream = client
                .subscribe(Subscription {
                    entities: entity,
                    kinds: kind,
                    from_seq: from.unwrap_or(1),
                    follow,
                    nodes: if all_nodes {
                        "all".into()
                    } else {
                        String::new()
                    },
                    topic: topic.unwrap_or_default(),
                })
                .await?;
            while let Some(e) = stream.next().await {
                output::event(&e?, json);
            }
        }
        Cmd::Raise {
            name,
            message,
            severity,
            stdin,
        } => {
            if stdin {
                raise_lines(&mut client, &name, severity).await?;
            } else {
                client
                    .raise(&name, severity, message.as_deref().unwrap_or_default())
                    .await?;
            }
        }
        Cmd::State { name, state } => client.set_state(&name, &state).await?,
        Cmd::Heartbeat { name } => client.heartbeat(&name).await?,
        Cmd::Nodes => {
            let r = call!(client, nodes, pb::NodesRequest {});
            output::nodes(&r, json);
        }
        Cmd::Cert(_) => unreachable!("handled before connecting"),
        Cmd::Reload => {
            let r = call!(client, reload, pb::ReloadRequest {});
            output::reload(&r, json);
        }
        Cmd::Stop { kill_entities } => {
            call!(client, shutdown, pb::ShutdownRequest { kill_entities });
        }
        Cmd::Verbose { level } => {
            call!(client, set_verbose, pb::SetVerboseRequest { level });
        }
    }
    Ok(())
}

async fn entity(client: &mut Client, cmd: EntityCmd) -> anyhow::Result<()> {
    let r = |name: String| pb::EntityRef { name };
    match cmd {
        EntityCmd::Add {
            name,
            opts,
            command,
        } => {
            let kind = pb::entity_def::Kind::Command(command_line(command, &opts));
            call!(
                client,
                add_entity,
                pb::AddEntityRequest {
                    entity: Some(entity_def(name, opts, kind)),
                }
            )
        }
        EntityCmd::Attach {
            name,
            pid,
            opts,
            command,
        } => {
            let restart_command = (!command.is_empty()).then(|| command_line(command, &opts));
            if opts.restart && restart_command.is_none() {
                bail!(
                    "--restart on an attached entity needs a command to restart it with (-- COMMAND …)"
                );
            }
            let kind = pb::entity_def::Kind::Attach(pb::AttachPid {
                pid,
                restart_command,
            });
            call!(
                client,
                add_entity,
                pb::AddEntityRequest {
                    entity: Some(entity_def(name, opts, kind)),
                }
            )
        }
        EntityCmd::Remote { name, target } => {
            call!(
                client,
                add_entity,
                pb::AddEntityRequest {
                    entity: Some(pb::EntityDef {
                        name,
                        kind: Some(pb::entity_def::Kind::Remote(target)),
                        ..Default::default()
                    }),
                }
            )
        }
        EntityCmd::Global { name } => {
            call!(
                client,
                add_entity,
                pb::AddEntityRequest {
                    entity: Some(pb::EntityDef {
                        name,
                        kind: Some(pb::entity_def::Kind::Global(true)),
                        ..Default::default()
                    }),
                }
            )
        }
        EntityCmd::Rm { name, keep_running } => {
            call!(
                client,
                remove_entity,
                pb::RemoveEntityRequest { name, keep_running }
            )
        }
        EntityCmd::Stop { name } => call!(client, stop_entity, r(name)),
        EntityCmd::Start { name } => call!(client, start_entity, r(name)),
        EntityCmd::Restart { name } => call!(client, restart, r(name)),
    };
    Ok(())
}

async fn action_add(client: &mut Client, cmd: ActionCmd) -> anyhow::Result<()> {
    use pb::action_def::Kind;
    let ActionCmd::Add {
        entity,
        condition,
        kind,
        name,
        delay,
        repeat,
        break_on_fail,
        remove_on_fail,
        do_now,
        message,
        level,
        signal,
        pid,
        target,
        path,
        timeout,
        command,
    } = cmd
    else {
        unreachable!("only add reaches here");
    };
    let kind = match kind.as_str() {
        "restart" => Kind::Restart(pb::Empty {}),
        "execute" => {
            if command.is_empty() {
                bail!("execute needs a command: ham action add E C execute -- COMMAND …");
            }
            Kind::Execute(pb::CommandLine {
                argv: command,
                ..Default::default()
            })
        }
        "notify" => Kind::Notify(message.unwrap_or_default()),
        "signal" => {
            let s = signal.context("signal needs --signal")?;
            let number = ham_core_signal(&s).with_context(|| format!("{s:?} is not a signal"))?;
            Kind::Signal(pb::SignalDef {
                signal: number,
                target: Some(match (pid, target) {
                    (Some(p), None) => pb::signal_def::Target::Pid(p),
                    (None, t) => pb::signal_def::Target::Entity(t.unwrap_or_default()),
                    _ => bail!("give --pid or --target, not both"),
                }),
            })
        }
        "waitfor" => Kind::Waitfor(pb::WaitforDef {
            path: path.context("waitfor needs --path")?,
            timeout_ms: ms(timeout.context("waitfor needs --timeout")?),
        }),
        "heartbeat-healthy" => Kind::HeartbeatHealthy(pb::Empty {}),
        "log" => Kind::Log(pb::LogDef {
            message: message.context("log needs --message")?,
            level: match level.as_str() {
                "error" => 0,
                "warn" => 1,
                "info" => 2,
                "debug" => 3,
                l => bail!("level {l:?} is not error, warn, info or debug"),
            },
        }),
        other => bail!(
            "{other:?} is not an action kind: restart, execute, notify, signal, waitfor, heartbeat-healthy, log"
        ),
    };
    let action = pb::ActionDef {
        name: name.unwrap_or_default(),
        kind: Some(kind),
        delay_ms: delay.map_or(0, ms),
        repeat,
        break_on_fail,
        keep_on_fail: Some(!remove_on_fail),
        do_now,
        on_fail: Vec::new(),
    };
    call!(
        client,
        add_action,
        pb::AddActionRequest {
            entity,
            condition,
            action: Some(action),
        }
    );
    Ok(())
}

/// A signal number from a name (`TERM`, `SIGUSR1`) or a number.
fn ham_core_signal(s: &str) -> Option<i32> {
    let n = s.trim().to_ascii_uppercase();
    let n = n.strip_prefix("SIG").unwrap_or(&n);
    const NAMES: [(&str, i32); 12] = [
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("ABRT", 6),
        ("KILL", 9),
        ("USR1", 10),
        ("SEGV", 11),
        ("USR2", 12),
        ("PIPE", 13),
        ("ALRM", 14),
        ("TERM", 15),
        ("CONT", 18),
    ];
    NAMES
        .iter()
        .find(|(k, _)| *k == n)
        .map(|(_, v)| *v)
        .or_else(|| n.parse().ok())
}

/// `ham raise NAME --stdin`: one raise per line of standard input, over one stream.
async fn raise_lines(client: &mut Client, name: &str, severity: u32) -> anyhow::Result<()> {
    let mut stream = client.raise_stream().await?;
    // Standard input is read on a thread of its own: the stream is sent meanwhile.
    let (tx, mut lines) = tokio::sync::mpsc::channel::<std::io::Result<String>>(1024);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let line = line.map_err(|e| anyhow::anyhow!("standard input: {e}"))?;
        if let Err(e) = stream.raise(name, severity, &line).await {
            anyhow::bail!("{e} ({} raised before it)", stream.handled());
        }
    }
    let sent = stream.sent();
    stream
        .finish()
        .await
        .map_err(|e| anyhow::anyhow!("{e} (of {sent} lines)"))?;
    Ok(())
}
