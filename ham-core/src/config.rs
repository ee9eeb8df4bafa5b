//! The declarative config: TOML text in, validated [`EntitySpec`]s out.
//!
//! Errors name the file, line and column of the culprit. Parsing is pure (the caller
//! reads the file), so a bad config is refused before anything changes.

use crate::spec::{
    ActionFlags, ActionKind, ActionSpec, CommandSpec, ConditionFlags, ConditionKind, ConditionSpec,
    EntityKind, EntitySpec, HeartbeatSpec, RestartPolicy, SignalTarget, StopSpec,
};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;
use toml::Spanned;

/// A config error, pointing at the culprit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file's name as given.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

/// Node settings from the `[node]` table; flags override them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// The node's name.
    pub name: Option<String>,
    /// The control socket's path.
    pub socket: Option<String>,
    /// The shared-memory state file's path.
    pub state: Option<String>,
    /// How many entities the store holds.
    pub capacity: Option<u32>,
}

/// Mesh settings from the `[mesh]` table; flags override them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSettings {
    /// UDP address to listen on (`ADDR:PORT`); the mesh is off without it.
    pub listen: Option<String>,
    /// Where other nodes reach this one (`HOST:PORT`).
    pub advertise: Option<String>,
    /// Nodes to join through (`HOST:PORT`).
    #[serde(default)]
    pub seeds: Vec<String>,
    /// This node's certificate (PEM).
    pub cert: Option<String>,
    /// This node's private key (PEM).
    pub key: Option<String>,
    /// The cluster CA's certificate (PEM).
    pub ca: Option<String>,
}

/// A parsed, validated config.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `[node]` settings.
    pub node: NodeSettings,
    /// `[mesh]` settings.
    pub mesh: MeshSettings,
    /// Every `[[entity]]`, in file order.
    pub entities: Vec<EntitySpec>,
}

/// Parses and validates a config. `file` is used in error messages only.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
    let at = |offset: usize, message: String| {
        let (line, column) = line_col(text, offset);
        ConfigError {
            file: file.to_string(),
            line,
            column,
            message,
        }
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        at(offset, e.message().trim().to_string())
    })?;
    let mut entities = Vec::new();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for spanned in raw.entity {
        let start = spanned.span().start;
        let spec = spanned.into_inner().into_spec().map_err(|m| at(start, m))?;
        spec.validate().map_err(|e| at(start, e.to_string()))?;
        if names.insert(spec.name.clone(), start).is_some() {
            return Err(at(start, format!("entity {} is declared twice", spec.name)));
        }
        entities.push(spec);
    }
    Ok(Config {
        node: raw.node.unwrap_or_default(),
        mesh: raw.mesh.unwrap_or_default(),
        entities,
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: Option<NodeSettings>,
    mesh: Option<MeshSettings>,
    #[serde(default)]
    entity: Vec<Spanned<RawEntity>>,
}

/// A duration written as `"100ms"`, `"10s"`, `"1m 30s"`.
#[derive(Clone, Copy)]
struct Dur(u64);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(|d: Duration| Dur(d.as_millis().min(u64::MAX as u128) as u64))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a duration ({e}); write e.g. \"500ms\" or \"10s\""
                ))
            })
    }
}

/// A signal written as `"SIGTERM"`, `"TERM"` or a number.
#[derive(Clone, Copy)]
struct Sig(i32);

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(i32),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(Sig(n)),
            Raw::Name(s) => signal_number(&s).map(Sig).ok_or_else(|| {
                serde::de::Error::custom(format!("{s:?} is not a signal name (e.g. \"SIGTERM\")"))
            }),
        }
    }
}

/// The number of a signal given by name, with or without `SIG`.
pub fn signal_number(name: &str) -> Option<i32> {
    let n = name.trim().to_ascii_uppercase();
    let n = n.strip_prefix("SIG").unwrap_or(&n);
    Some(match n {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "TRAP" => 5,
        "ABRT" => 6,
        "BUS" => 7,
        "FPE" => 8,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        "CHLD" => 17,
        "CONT" => 18,
        "STOP" => 19,
        "TSTP" => 20,
        "WINCH" => 28,
        _ => return n.parse().ok(),
    })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCommand {
    Argv(Vec<String>),
    Shell(String),
}

impl RawCommand {
    fn into_spec(self, env: BTreeMap<String, String>, cwd: Option<String>) -> CommandSpec {
        let argv = match self {
            RawCommand::Argv(v) => v,
            RawCommand::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s],
        };
        CommandSpec { argv, env, cwd }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeartbeat {
    period: Dur,
    #[serde(default = "one")]
    low: u32,
    high: Option<u32>,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawRestart {
    Flag(bool),
    Policy(RawRestartPolicy),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestartPolicy {
    /// Which condition restarts it: a condition kind, or "manual" for none.
    on: Option<String>,
    limit: Option<u32>,
    within: Option<Dur>,
    backoff: Option<Dur>,
    backoff_max: Option<Dur>,
    #[serde(default)]
    escalate: Vec<RawAction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntity {
    name: String,
    command: Option<RawCommand>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    pid: Option<i32>,
    #[serde(default)]
    global: bool,
    remote: Option<String>,
    heartbeat: Option<RawHeartbeat>,
    restart: Option<RawRestart>,
    stop_signal: Option<Sig>,
    stop_timeout: Option<Dur>,
    autostart: Option<bool>,
    #[serde(default)]
    condition: Vec<RawCondition>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCondition {
    on: String,
    name: Option<String>,
    rearm: Option<bool>,
    #[serde(default)]
    no_wait: bool,
    #[serde(default)]
    independent: bool,
    severity: Option<u32>,
    from: Option<String>,
    to: Option<String>,
    node: Option<String>,
    #[serde(default)]
    action: Vec<RawAction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    #[serde(rename = "do")]
    kind: String,
    name: Option<String>,
    command: Option<RawCommand>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    message: Option<String>,
    level: Option<String>,
    signal: Option<Sig>,
    pid: Option<i32>,
    entity: Option<String>,
    path: Option<String>,
    timeout: Option<Dur>,
    node: Option<String>,
    #[serde(default)]
    candidates: Vec<String>,
    delay: Option<Dur>,
    repeat: Option<u32>,
    #[serde(default)]
    break_on_fail: bool,
    keep_on_fail: Option<bool>,
    #[serde(default)]
    do_now: bool,
    #[serde(default)]
    on_fail: Vec<RawAction>,
}

/// `ENTITY@NODE` → a remote entity.
pub fn parse_remote(text: &str) -> Result<EntityKind, String> {
    match text.split_once('@') {
        Some((entity, node)) if !entity.is_empty() && !node.is_empty() => Ok(EntityKind::Remote {
            node: node.to_string(),
            entity: entity.to_string(),
        }),
        _ => Err(format!("remote = {text:?} must be ENTITY@NODE (web@b)")),
    }
}

impl RawEntity {
    fn into_spec(self) -> Result<EntitySpec, String> {
        let n = &self.name;
        let kind = match (self.command, self.pid, self.global, self.remote) {
            (Some(c), None, false, None) => EntityKind::Started(c.into_spec(self.env, self.cwd)),
            (c, Some(pid), false, None) => EntityKind::Attached {
                pid,
                restart_command: c.map(|c| c.into_spec(self.env, self.cwd)),
            },
            (None, None, true, None) => EntityKind::Global,
            (None, None, false, Some(r)) => {
                parse_remote(&r).map_err(|e| format!("entity {n}: {e}"))?
            }
            (None, None, false, None) => {
                return Err(format!(
                    "entity {n}: give a command to start it, a pid to attach it, \
                     global = true, or remote = \"ENTITY@NODE\""
                ));
            }
            (_, _, _, Some(_)) => {
                return Err(format!(
                    "entity {n}: a remote entity has no command, pid or global"
                ));
            }
            _ => return Err(format!("entity {n}: a global entity has no command or pid")),
        };
        let mut spec = EntitySpec::new(self.name.clone(), kind);
        if let Some(hb) = self.heartbeat {
            spec.heartbeat = Some(HeartbeatSpec {
                period_ms: hb.period.0,
                low: hb.low,
                high: hb.high.unwrap_or(hb.low),
            });
        }
        spec.stop = StopSpec {
            signal: self.stop_signal.map_or(StopSpec::default().signal, |s| s.0),
            timeout_ms: self
                .stop_timeout
                .map_or(StopSpec::default().timeout_ms, |d| d.0),
        };
        spec.autostart = self.autostart.unwrap_or(true);
        for c in self.condition {
            spec.conditions.push(c.into_spec(n)?);
        }
        match self.restart {
            None | Some(RawRestart::Flag(false)) => {}
            Some(RawRestart::Flag(true)) => spec = spec.with_restart_on_death(),
            Some(RawRestart::Policy(p)) => {
                spec.restart_policy = RestartPolicy {
                    max_restarts: p.limit.unwrap_or(0),
                    window_ms: p.within.map_or(0, |d| d.0),
                    backoff_initial_ms: p.backoff.map_or(0, |d| d.0),
                    backoff_max_ms: p.backoff_max.map_or(0, |d| d.0),
                };
                if p.limit.is_some() != p.within.is_some() {
                    return Err(format!(
                        "entity {n}: restart limit and within go together (limit = 3, within = \"10s\")"
                    ));
                }
                let on = p.on.as_deref().unwrap_or("death");
                if on != "manual" {
                    let kind = ConditionKind::parse(on).ok_or_else(|| {
                        format!(
                            "entity {n}: restart.on = {on:?} is not a condition kind or \"manual\""
                        )
                    })?;
                    let mut restart = ActionSpec::new("restart", ActionKind::Restart);
                    restart.on_fail = actions(n, p.escalate, "escalate")?;
                    spec.conditions.push(ConditionSpec::new(
                        format!("restart-on-{on}"),
                        kind,
                        vec![restart],
                    ));
                } else if !p.escalate.is_empty() {
                    return Err(format!(
                        "entity {n}: escalate needs an automatic restart (restart.on)"
                    ));
                }
            }
        }
        Ok(spec)
    }
}

impl RawCondition {
    fn into_spec(self, entity: &str) -> Result<ConditionSpec, String> {
        let kind = ConditionKind::parse(&self.on).ok_or_else(|| {
            format!(
                "entity {entity}: condition on = {:?} is not one of {}",
                self.on,
                ConditionKind::names()
            )
        })?;
        let name = self.name.unwrap_or_else(|| self.on.clone());
        let mut c = ConditionSpec::new(name.clone(), kind, actions(entity, self.action, &name)?);
        c.flags = ConditionFlags {
            rearm: self.rearm.unwrap_or(true),
            no_wait: self.no_wait,
            independent: self.independent,
        };
        c.min_severity = self.severity.unwrap_or(0);
        c.from_state = self.from;
        c.to_state = self.to;
        if self.node.is_some() && !matches!(kind, ConditionKind::NodeDown | ConditionKind::NodeUp) {
            return Err(format!(
                "entity {entity}: condition {name}: `node` filters node-down and node-up only"
            ));
        }
        c.node = self.node;
        Ok(c)
    }
}

/// Converts a list of raw actions, naming unnamed ones after their kind (`restart`,
/// `execute-2` …) so that names stay unique.
fn actions(entity: &str, raw: Vec<RawAction>, within: &str) -> Result<Vec<ActionSpec>, String> {
    let mut out: Vec<ActionSpec> = Vec::new();
    for (i, a) in raw.into_iter().enumerate() {
        let mut spec = a.into_spec(entity, within)?;
        if spec.name.is_empty() {
            let base = spec.kind.as_str().to_string();
            spec.name = if out.iter().any(|o| o.name == base) {
                format!("{base}-{}", i + 1)
            } else {
                base
            };
        }
        out.push(spec);
    }
    Ok(out)
}

impl RawAction {
    fn into_spec(self, entity: &str, within: &str) -> Result<ActionSpec, String> {
        let here = format!("entity {entity}, {within}, action {}", self.kind);
        let need =
            |v: Option<String>, field: &str| v.ok_or_else(|| format!("{here}: needs {field}"));
        let kind = match (self.kind.as_str(), self.node) {
            ("restart", Some(node)) => ActionKind::RemoteRestart {
                node,
                entity: need(self.entity, "entity (the entity to restart on that node)")?,
            },
            ("execute", Some(node)) => ActionKind::RemoteExecute {
                node,
                command: self
                    .command
                    .ok_or_else(|| format!("{here}: needs command"))?
                    .into_spec(self.env, self.cwd),
            },
            ("failover", None) => {
                if self.candidates.is_empty() {
                    return Err(format!(
                        "{here}: needs candidates (the nodes that may run it)"
                    ));
                }
                ActionKind::Failover {
                    entity: need(self.entity, "entity (the entity to start)")?,
                    candidates: self.candidates,
                }
            }
            (k, Some(_)) => {
                return Err(format!(
                    "{here}: `node` is for restart and execute; a {k} action runs here"
                ));
            }
            (k, None) => match k {
                "restart" => ActionKind::Restart,
                "execute" => ActionKind::Execute(
                    self.command
                        .ok_or_else(|| format!("{here}: needs command"))?
                        .into_spec(self.env, self.cwd),
                ),
                "notify" => ActionKind::Notify {
                    message: self.message.unwrap_or_default(),
                },
                "signal" => ActionKind::Signal {
                    target: match (self.pid, self.entity) {
                        (Some(p), None) => SignalTarget::Pid(p),
                        (None, e) => SignalTarget::Entity(e.unwrap_or_default()),
                        (Some(_), Some(_)) => {
                            return Err(format!("{here}: give pid or entity, not both"));
                        }
                    },
                    signal: self
                        .signal
                        .ok_or_else(|| format!("{here}: needs signal"))?
                        .0,
                },
                "waitfor" => ActionKind::Waitfor {
                    path: need(self.path, "path")?,
                    timeout_ms: self
                        .timeout
                        .ok_or_else(|| format!("{here}: needs timeout"))?
                        .0,
                },
                "heartbeat-healthy" => ActionKind::HeartbeatHealthy,
                "log" => ActionKind::Log {
                    message: need(self.message, "message")?,
                    level: match self.level.as_deref().unwrap_or("info") {
                        "error" => 0,
                        "warn" => 1,
                        "info" => 2,
                        "debug" => 3,
                        l => {
                            return Err(format!(
                                "{here}: level {l:?} is not error, warn, info or debug"
                            ));
                        }
                    },
                },
                other => {
                    return Err(format!(
                        "entity {entity}, {within}: action do = {other:?} is not one of restart, execute, notify, signal, waitfor, heartbeat-healthy, log, failover"
                    ));
                }
            },
        };
        Ok(ActionSpec {
            name: self.name.unwrap_or_default(),
            kind,
            delay_ms: self.delay.map_or(0, |d| d.0),
            repeat: self.repeat.unwrap_or(1),
            flags: ActionFlags {
                break_on_fail: self.break_on_fail,
                keep_on_fail: self.keep_on_fail.unwrap_or(true),
                do_now: self.do_now,
            },
            on_fail: actions(entity, self.on_fail, &format!("{within} on_fail"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
name = "a"

[[entity]]
name = "web"
command = ["/bin/sleep", "1000"]
env = { MODE = "prod" }
heartbeat = { period = "1s", low = 2, high = 4 }
restart = { limit = 3, within = "10s", backoff = "100ms", backoff_max = "2s", escalate = [
  { do = "execute", command = "echo escalated" },
] }

[[entity.condition]]
on = "heartbeat-missed-high"
[[entity.condition.action]]
do = "restart"
[[entity.condition.action]]
do = "waitfor"
path = "/tmp/web.sock"
timeout = "5s"
[[entity.condition.action.on_fail]]
do = "log"
message = "web did not come back"
level = "error"

[[entity]]
name = "sensors"
global = true
[[entity.condition]]
on = "raise"
severity = 3
action = [{ do = "notify", message = "sensor trouble" }]
"#;

    #[test]
    fn a_full_config_parses_into_specs() {
        let c = parse("ham.toml", GOOD).expect("parses");
        assert_eq!(c.node.name.as_deref(), Some("a"));
        assert_eq!(c.entities.len(), 2);
        let web = &c.entities[0];
        assert_eq!(
            web.heartbeat.map(|h| (h.period_ms, h.low, h.high)),
            Some((1000, 2, 4))
        );
        assert_eq!(web.restart_policy.max_restarts, 3);
        assert_eq!(web.restart_policy.window_ms, 10_000);
        assert_eq!(web.conditions.len(), 2);
        let restart = &web.conditions[1];
        assert_eq!(restart.kind, ConditionKind::Death);
        assert_eq!(restart.actions[0].on_fail.len(), 1);
        let hb = &web.conditions[0];
        assert_eq!(hb.actions[1].on_fail[0].name, "log");
        assert_eq!(c.entities[1].conditions[0].min_severity, 3);
    }

    #[test]
    fn a_syntax_error_names_line_and_column() {
        let e = parse("x.toml", "[[entity]]\nname = \"a\"\ncommand = [\"sh\"\n").unwrap_err();
        assert_eq!(e.file, "x.toml");
        assert_eq!(e.line, 3, "{e}");
    }

    #[test]
    fn an_unknown_field_is_refused_where_it_stands() {
        let e = parse(
            "x.toml",
            "[[entity]]\nname = \"a\"\ncommand = \"true\"\nrestrat = true\n",
        )
        .unwrap_err();
        assert_eq!((e.line, e.column), (4, 1), "{e}");
        assert!(e.message.contains("restrat"), "{e}");
    }

    #[test]
    fn a_bad_duration_points_at_its_value() {
        let text =
            "[[entity]]\nname = \"a\"\ncommand = \"true\"\nheartbeat = { period = \"soon\" }\n";
        let e = parse("x.toml", text).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("not a duration"), "{e}");
    }

    #[test]
    fn a_semantic_error_points_at_the_entity() {
        let text = "[[entity]]\nname = \"ok\"\nglobal = true\n\n[[entity]]\nname = \"bad one\"\ncommand = \"true\"\n";
        let e = parse("x.toml", text).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("bad one"), "{e}");
    }

    #[test]
    fn an_unknown_condition_kind_lists_the_known_ones() {
        let text =
            "[[entity]]\nname = \"a\"\ncommand = \"true\"\n[[entity.condition]]\non = \"dead\"\n";
        let e = parse("x.toml", text).unwrap_err();
        assert!(e.message.contains("abnormal-death"), "{e}");
    }

    #[test]
    fn duplicate_entities_are_refused() {
        let text =
            "[[entity]]\nname = \"a\"\nglobal = true\n[[entity]]\nname = \"a\"\nglobal = true\n";
        let e = parse("x.toml", text).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
    }

    #[test]
    fn restart_on_a_global_entity_is_refused() {
        let text = "[[entity]]\nname = \"g\"\nglobal = true\nrestart = true\n";
        let e = parse("x.toml", text).unwrap_err();
        assert!(e.message.contains("no command to restart"), "{e}");
    }

    #[test]
    fn a_remote_entity_names_an_entity_and_its_node() {
        let text = "[[entity]]\nname = \"webb\"\nremote = \"web@b\"\n";
        let c = parse("x.toml", text).expect("valid");
        assert_eq!(
            c.entities[0].kind,
            EntityKind::Remote {
                node: "b".into(),
                entity: "web".into()
            }
        );
        for bad in ["web", "@b", "web@", "web@no_such node"] {
            let text = format!("[[entity]]\nname = \"x\"\nremote = \"{bad}\"\n");
            assert!(parse("x.toml", &text).is_err(), "{bad} must be refused");
        }
        let both = "[[entity]]\nname = \"x\"\nremote = \"web@b\"\ncommand = \"true\"\n";
        let e = parse("x.toml", both).unwrap_err();
        assert!(e.message.contains("remote entity has no command"), "{e}");
    }
}
