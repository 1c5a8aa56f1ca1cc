//! One pod's life on the node: volumes and env (retried while missing, as the kubelet does),
//! init containers in order, then all containers, status writes, and the ways a pod stops
//! (exit, deletion, disappearance, deadline, faults).

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use kube::ResourceExt;
use kube::api::{Api, EvictParams, Patch, PatchParams};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::env::{ConfigError, PodFacts, Sources, expand, expand_argv, resolve_env, service_env};
use super::runtime::{self, Launch, LaunchMode, MountSpec, Sandbox};
use super::status::{self, CState, ContainerView, PodView};
use super::volumes::{self, HostVolume, VolumeCtx};
use super::{ContainerExit, Fault, KubeletConfig, KubeletEvent, Msg, Shared, delete_now, now};

/// `PATH` inside an isolated container (the executable is bound under `/.kubelet/bin`).
const CONTAINER_PATH: &str =
    "/.kubelet/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where unmapped commands are looked up on the host.
const SYSTEM_PATH: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Init,
    Main,
}

struct Ctr {
    kind: Kind,
    spec: Container,
    view: ContainerView,
    /// The process signalled for this container.
    pid: Option<u32>,
    oom: bool,
    launch: Option<Result<Launch, String>>,
    pull_error: bool,
}

struct ExitInfo {
    code: i32,
    signal: Option<i32>,
    finished_at: String,
}

/// How the pod's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Every container ended by itself (or an init container failed).
    Completed,
    /// `deletionTimestamp`: stop, final status, delete with grace 0.
    Deleted,
    /// The object vanished (or the kubelet stops): stop, no status.
    Gone,
    /// The pod's `activeDeadlineSeconds`.
    Deadline,
    /// [`Fault::Terminate`].
    Terminated,
    /// [`Fault::Evict`] on a server without the Eviction API.
    Evicted,
    /// Graceful node shutdown: `DisruptionTarget`, stop, `Failed` with reason `Terminated`.
    NodeShutdown,
    /// The machine vanished: SIGKILL, no status.
    NodeGone,
}

enum Step {
    Exit(usize, ExitInfo),
    Msg(Option<Msg>),
    Deadline,
}

struct Worker {
    sh: Arc<Shared>,
    pod: Pod,
    ns: String,
    name: String,
    uid: String,
    spec: PodSpec,
    dir: PathBuf,
    facts: PodFacts,
    ctrs: Vec<Ctr>,
    exits_tx: mpsc::UnboundedSender<(usize, ExitInfo)>,
    exits_rx: mpsc::UnboundedReceiver<(usize, ExitInfo)>,
    start_time: String,
    deadline: Option<Instant>,
    failed: Option<(String, String)>,
    force_failed: bool,
    extra_conditions: Vec<(String, String, String)>,
    last_written: Option<Value>,
    gone: bool,
    last_error: Option<String>,
    /// Nothing will run any more.
    terminal: bool,
    /// The node's shutdown grace period, once it shuts down.
    shutdown_grace: Option<Duration>,
}

/// Run the pod to its end, then hand it back to the registry.
pub(crate) async fn run(sh: Arc<Shared>, pod: Pod, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut w = Worker::new(sh.clone(), pod);
    let end = w.lifecycle(&mut rx).await;
    w.finish(end).await;
    let mut deletion = end != End::Deleted && w.pod.metadata.deletion_timestamp.is_some();
    {
        let mut st = sh.lock();
        st.pods.remove(&w.uid);
        st.done.insert(w.uid.clone());
        // A deletion that arrived while finishing still needs its final delete.
        while let Ok(msg) = rx.try_recv() {
            if let Msg::Update(p) = msg
                && p.metadata.deletion_timestamp.is_some()
            {
                w.pod = *p;
                deletion = end != End::Deleted;
            }
        }
        if deletion && !st.finalized.insert(w.uid.clone()) {
            deletion = false;
        }
    }
    sh.workers_done.send_modify(|n| *n += 1);
    if deletion && let Err(e) = delete_now(&sh.client, &w.pod).await {
        w.error(format!("delete the finished pod: {e:#}"));
    }
}

impl Worker {
    fn new(sh: Arc<Shared>, pod: Pod) -> Self {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let uid = pod.uid().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let dir = sh.dir.path().join("pods").join(&uid);
        let cfg = &sh.cfg;
        let facts = PodFacts {
            name: name.clone(),
            namespace: ns.clone(),
            uid: uid.clone(),
            node_name: spec.node_name.clone().unwrap_or_default(),
            service_account: spec
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            pod_ip: cfg.node_ip.clone(),
            host_ip: cfg.node_ip.clone(),
            labels: pod.labels().clone(),
            annotations: pod.annotations().clone(),
        };
        let pull = |c: &Container| {
            cfg.image_pull_error.as_ref().is_some_and(|m| {
                c.image
                    .as_deref()
                    .is_some_and(|i| !m.is_empty() && i.contains(m.as_str()))
            })
        };
        let has_init = spec.init_containers.as_ref().is_some_and(|i| !i.is_empty());
        let mut ctrs = Vec::new();
        for (kind, list) in [
            (Kind::Init, spec.init_containers.clone().unwrap_or_default()),
            (Kind::Main, spec.containers.clone()),
        ] {
            for c in list {
                let waiting = if kind == Kind::Main && has_init {
                    "PodInitializing"
                } else {
                    "ContainerCreating"
                };
                ctrs.push(Ctr {
                    kind,
                    view: ContainerView {
                        name: c.name.clone(),
                        image: c.image.clone().unwrap_or_default(),
                        container_id: None,
                        state: CState::waiting(waiting),
                    },
                    pid: None,
                    oom: false,
                    launch: None,
                    pull_error: pull(&c),
                    spec: c,
                });
            }
        }
        let deadline = spec
            .active_deadline_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(|s| Instant::now() + Duration::from_secs(s));
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        sh.lock().logs.remove(&(ns.clone(), name.clone()));
        Worker {
            sh,
            pod,
            ns,
            name,
            uid,
            spec,
            dir,
            facts,
            ctrs,
            exits_tx,
            exits_rx,
            start_time: now(),
            deadline,
            failed: None,
            force_failed: false,
            extra_conditions: Vec::new(),
            last_written: None,
            gone: false,
            last_error: None,
            terminal: false,
            shutdown_grace: None,
        }
    }

    fn cfg(&self) -> &KubeletConfig {
        &self.sh.cfg
    }

    fn error(&mut self, message: String) {
        if self.last_error.as_deref() == Some(message.as_str()) {
            return;
        }
        tracing::warn!(pod = %format!("{}/{}", self.ns, self.name), %message, "kubelet");
        self.last_error = Some(message.clone());
        self.sh.emit(KubeletEvent::Error {
            namespace: self.ns.clone(),
            pod: self.name.clone(),
            message,
        });
    }

    fn indices(&self, kind: Kind) -> Vec<usize> {
        (0..self.ctrs.len())
            .filter(|i| self.ctrs[*i].kind == kind)
            .collect()
    }

    fn view(&self) -> PodView {
        let of = |k: Kind| {
            self.ctrs
                .iter()
                .filter(|c| c.kind == k)
                .map(|c| c.view.clone())
                .collect()
        };
        PodView {
            init: of(Kind::Init),
            containers: of(Kind::Main),
            restart_policy: self
                .spec
                .restart_policy
                .clone()
                .unwrap_or_else(|| "Always".into()),
            start_time: self.start_time.clone(),
            host_ip: self.facts.host_ip.clone(),
            pod_ip: self.facts.pod_ip.clone(),
            failed: self.failed.clone(),
            force_failed: self.force_failed,
            extra_conditions: self.extra_conditions.clone(),
            terminal: self.terminal,
        }
    }

    async fn lifecycle(&mut self, rx: &mut mpsc::UnboundedReceiver<Msg>) -> End {
        if self.pod.metadata.deletion_timestamp.is_some() {
            return End::Deleted;
        }
        self.write_status().await;
        if self.gone {
            return End::Gone;
        }
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.prepare().await {
                Ok(()) => break,
                Err((reason, message)) => {
                    self.error(message.clone());
                    for c in &mut self.ctrs {
                        if matches!(c.view.state, CState::Waiting { .. }) {
                            c.view.state = CState::Waiting {
                                reason: reason.into(),
                                message: Some(message.clone()),
                            };
                        }
                    }
                    self.write_status().await;
                    if let Some(end) = self.idle(rx, backoff).await {
                        return end;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.last_error = None;
        for i in self.indices(Kind::Init) {
            if self.ctrs[i].pull_error {
                self.pull_failed(i);
                self.write_status().await;
                // Blocked for good: only a stop ends it.
                return self.wait_until(rx, |_| false).await.unwrap_or(End::Gone);
            }
            self.start(i).await;
            self.write_status().await;
            if let Some(end) = self
                .wait_until(rx, |w| w.ctrs[i].view.state.is_terminated())
                .await
            {
                return end;
            }
            if self.ctrs[i].view.state.exit_code() != Some(0) {
                return End::Completed;
            }
        }
        for i in self.indices(Kind::Main) {
            if !self.ctrs[i].view.state.is_terminated() {
                self.ctrs[i].view.state = CState::waiting("ContainerCreating");
            }
        }
        for i in self.indices(Kind::Main) {
            if self.ctrs[i].pull_error {
                self.pull_failed(i);
            } else {
                self.start(i).await;
            }
        }
        self.write_status().await;
        if status::phase_of(&self.view()) == "Running" {
            let pid = self
                .indices(Kind::Main)
                .first()
                .and_then(|i| self.ctrs[*i].pid)
                .unwrap_or(0);
            self.sh.emit(KubeletEvent::PodRunning {
                namespace: self.ns.clone(),
                pod: self.name.clone(),
                pid,
            });
        }
        let all_done = |w: &Worker| {
            w.ctrs
                .iter()
                .filter(|c| c.kind == Kind::Main)
                .all(|c| c.view.state.is_terminated())
        };
        match self.wait_until(rx, all_done).await {
            Some(end) => end,
            None => End::Completed,
        }
    }

    fn pull_failed(&mut self, i: usize) {
        let c = &mut self.ctrs[i];
        c.view.state = CState::Waiting {
            reason: "ErrImagePull".into(),
            message: Some(format!(
                "failed to pull and unpack image \"{}\": not found",
                c.view.image
            )),
        };
        self.sh.emit(KubeletEvent::ImagePullError {
            namespace: self.ns.clone(),
            pod: self.name.clone(),
            container: c.spec.name.clone(),
        });
    }

    async fn next_step(&mut self, rx: &mut mpsc::UnboundedReceiver<Msg>) -> Step {
        let deadline = self.deadline;
        tokio::select! {
            Some((i, info)) = self.exits_rx.recv() => Step::Exit(i, info),
            msg = rx.recv() => Step::Msg(msg),
            _ = sleep_until(deadline) => Step::Deadline,
        }
    }

    /// Process exits and messages until `done` holds (None) or the pod must stop (Some).
    async fn wait_until(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Msg>,
        done: impl Fn(&Worker) -> bool,
    ) -> Option<End> {
        loop {
            if done(self) {
                return None;
            }
            match self.next_step(rx).await {
                Step::Exit(i, info) => {
                    self.record_exit(i, info);
                    if !done(self) {
                        self.write_status().await;
                    }
                }
                Step::Msg(m) => {
                    if let Some(end) = self.on_msg(m).await {
                        return Some(end);
                    }
                }
                Step::Deadline => return Some(End::Deadline),
            }
        }
    }

    /// Wait `backoff` while handling messages (nothing runs yet).
    async fn idle(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Msg>,
        backoff: Duration,
    ) -> Option<End> {
        let until = Instant::now() + backoff;
        loop {
            let deadline = self.deadline;
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return None,
                _ = sleep_until(deadline) => return Some(End::Deadline),
                m = rx.recv() => if let Some(end) = self.on_msg(m).await { return Some(end) },
            }
        }
    }

    async fn on_msg(&mut self, msg: Option<Msg>) -> Option<End> {
        match msg {
            None | Some(Msg::Gone) => Some(End::Gone),
            Some(Msg::Update(p)) => {
                let deleting = p.metadata.deletion_timestamp.is_some();
                self.pod = *p;
                deleting.then_some(End::Deleted)
            }
            Some(Msg::Fault(Fault::OomKill { container })) => {
                let target = self.ctrs.iter().position(|c| {
                    c.view.state.is_running()
                        && container.as_ref().is_none_or(|n| *n == c.spec.name)
                });
                match target {
                    Some(i) => {
                        self.ctrs[i].oom = true;
                        if let Some(pid) = self.ctrs[i].pid {
                            signal_group(pid, Signal::SIGKILL);
                        }
                    }
                    None => self.error(format!("OOM kill: no running container {container:?}")),
                }
                None
            }
            Some(Msg::Fault(Fault::Evict)) => {
                if !self.sh.eviction_api {
                    return Some(End::Evicted);
                }
                let api: Api<Pod> = Api::namespaced(self.sh.client.clone(), &self.ns);
                let (name, sh) = (self.name.clone(), self.sh.clone());
                let ns = self.ns.clone();
                tokio::spawn(async move {
                    if let Err(e) = api.evict(&name, &EvictParams::default()).await {
                        sh.emit(KubeletEvent::Error {
                            namespace: ns,
                            pod: name,
                            message: format!("eviction: {e}"),
                        });
                    }
                });
                None
            }
            Some(Msg::Fault(Fault::Terminate)) => Some(End::Terminated),
            Some(Msg::NodeShutdown(grace)) => {
                self.shutdown_grace = Some(grace);
                Some(End::NodeShutdown)
            }
            Some(Msg::NodeGone) => {
                // Nothing can be written from a machine that is gone.
                self.gone = true;
                Some(End::NodeGone)
            }
        }
    }

    /// Volumes, then every container's env and launch; `Err((waiting reason, message))`.
    async fn prepare(&mut self) -> Result<(), (&'static str, String)> {
        let isolates = self.sh.isolates;
        let fs_group = if isolates {
            self.spec
                .security_context
                .as_ref()
                .and_then(|s| s.fs_group)
                .and_then(|g| u32::try_from(g).ok())
        } else {
            None
        };
        let client = self.sh.client.clone();
        let ctx = VolumeCtx {
            client: &client,
            facts: &self.facts,
            fs_group,
        };
        let vols = volumes::materialise(&ctx, &self.spec, &self.dir)
            .await
            .map_err(|e| {
                (
                    "ContainerCreating",
                    format!("MountVolume.SetUp failed: {e:#}"),
                )
            })?;
        let specs: Vec<&Container> = self.ctrs.iter().map(|c| &c.spec).collect();
        let sources = Sources::fetch(&client, &self.ns, &specs)
            .await
            .map_err(|e| ("ContainerCreating", format!("{e:#}")))?;
        let mut launches = Vec::new();
        for c in &self.ctrs {
            let l = self
                .launch_for(&c.spec, &vols, &sources)
                .map_err(|ConfigError(m)| ("CreateContainerConfigError", m))?;
            launches.push(l);
        }
        for (c, l) in self.ctrs.iter_mut().zip(launches) {
            c.launch = Some(l);
        }
        Ok(())
    }

    /// How to start one container: Err(ConfigError) is retried, Ok(Err) is a start error.
    fn launch_for(
        &self,
        c: &Container,
        vols: &HashMap<String, HostVolume>,
        sources: &Sources,
    ) -> Result<Result<Launch, String>, ConfigError> {
        let cfg = self.cfg();
        let isolates = self.sh.isolates;
        let psc = self.spec.security_context.as_ref();
        let sc = c.security_context.as_ref();
        let ident = runtime::identity(psc, sc);
        let non_root = sc
            .and_then(|s| s.run_as_non_root)
            .or(psc.and_then(|p| p.run_as_non_root))
            == Some(true);
        if isolates && non_root && ident.uid.unwrap_or(0) == 0 {
            return Err(ConfigError(format!(
                "container has runAsNonRoot and image will run as root (pod: \"{}_{}({})\", container: {})",
                self.name, self.ns, self.uid, c.name
            )));
        }
        let home = if !isolates {
            self.dir.display().to_string()
        } else if ident.uid.unwrap_or(0) == 0 {
            "/root".into()
        } else {
            "/".into()
        };
        let path = if isolates {
            CONTAINER_PATH.to_string()
        } else {
            std::env::var("PATH").unwrap_or_else(|_| SYSTEM_PATH.join(":"))
        };
        let mut base = vec![
            ("PATH".to_string(), path),
            ("HOSTNAME".to_string(), self.name.clone()),
            ("HOME".to_string(), home),
        ];
        if let Some(api) = &cfg.api_server {
            base.extend(service_env(api).unwrap_or_default());
        }
        base.extend(cfg.extra_env.iter().cloned());
        let env = resolve_env(base, c, &self.facts, sources)?;
        let (command, args) = expand_argv(c, &env);
        let image = c.image.clone().unwrap_or_default();
        let (arg0, exe) = match command.first() {
            Some(cmd) => (cmd.clone(), resolve_binary(&cfg.binaries, cmd)),
            None => (image_name(&image), resolve_binary(&cfg.binaries, &image)),
        };
        let exe = match exe {
            Ok(e) => e,
            Err(m) => return Ok(Err(m)),
        };
        let args: Vec<String> = command.iter().skip(1).cloned().chain(args).collect();
        let mut mounts = Vec::new();
        let mut sub_paths = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let Some(v) = vols.get(&m.name) else {
                return Ok(Err(format!("volumeMount {:?} has no volume", m.name)));
            };
            let sub = match (&m.sub_path, &m.sub_path_expr) {
                (Some(s), _) if !s.is_empty() => s.clone(),
                (_, Some(e)) if !e.is_empty() => expand(e, |n| {
                    env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
                }),
                _ => String::new(),
            };
            let host = if sub.is_empty() {
                v.path.clone()
            } else {
                let rel = match volumes::safe_rel(&sub) {
                    Ok(r) => r,
                    Err(e) => return Ok(Err(format!("{e:#}"))),
                };
                let p = v.path.join(rel);
                sub_paths.push((v.path.clone(), p.clone()));
                p
            };
            if !m.mount_path.starts_with('/') {
                return Ok(Err(format!("mountPath {:?} is not absolute", m.mount_path)));
            }
            mounts.push(MountSpec {
                host,
                container: m.mount_path.clone(),
                read_only: m.read_only == Some(true) || v.read_only,
            });
        }
        if isolates {
            let root = self.dir.join("roots").join(&c.name);
            if let Err(e) = std::fs::create_dir_all(&root) {
                return Ok(Err(format!("container root {}: {e}", root.display())));
            }
            let privileged = sc.and_then(|s| s.privileged) == Some(true);
            let sandbox = Sandbox {
                root,
                hostname: self.name.chars().take(63).collect(),
                system: runtime::host_system_entries(),
                mounts,
                exe_name: exe_file_name(&arg0),
                workdir: c
                    .working_dir
                    .clone()
                    .filter(|w| w.starts_with('/'))
                    .unwrap_or_else(|| "/".into()),
                identity: ident,
                caps: runtime::capability_set(sc),
                no_new_privs: !privileged
                    && sc.and_then(|s| s.allow_privilege_escalation) != Some(true),
                read_only_root: sc.and_then(|s| s.read_only_root_filesystem) == Some(true),
                overlay: self.sh.overlay,
            };
            Ok(Ok(Launch {
                exe,
                arg0,
                args,
                env,
                mode: LaunchMode::Isolated(Box::new(sandbox)),
                sub_paths,
            }))
        } else {
            let remap = remapper(&mounts);
            let env = env.into_iter().map(|(k, v)| (k, remap(&v))).collect();
            let args = args.iter().map(|a| remap(a)).collect();
            let workdir = match &c.working_dir {
                Some(w) if !w.is_empty() => {
                    let local = PathBuf::from(remap(w));
                    if local.is_absolute() && local.starts_with(&self.dir) {
                        local
                    } else {
                        // An image path that does not exist here: a private dir instead.
                        self.dir.join("workdir").join(&c.name)
                    }
                }
                _ => self.dir.join("workdir").join(&c.name),
            };
            if let Err(e) = std::fs::create_dir_all(&workdir) {
                return Ok(Err(format!("working dir {}: {e}", workdir.display())));
            }
            Ok(Ok(Launch {
                exe,
                arg0,
                args,
                env,
                mode: LaunchMode::Plain { workdir },
                sub_paths,
            }))
        }
    }

    async fn start(&mut self, i: usize) {
        let launch = self.ctrs[i].launch.take();
        let log: Arc<Mutex<String>> = Arc::default();
        {
            let mut st = self.sh.lock();
            st.logs
                .entry((self.ns.clone(), self.name.clone()))
                .or_default()
                .push((self.ctrs[i].spec.name.clone(), log.clone()));
        }
        let started_at = now();
        let spawned = match launch {
            Some(Ok(l)) => make_sub_paths(&l.sub_paths)
                .map_err(|m| (m, None))
                .and_then(|()| {
                    runtime::spawn(&l).map_err(|e| {
                        let msg = format!("failed to start {}: {}", l.exe.display(), e.error);
                        (msg, e.stderr)
                    })
                }),
            Some(Err(m)) => Err((m, None)),
            None => Err(("container was not prepared".to_string(), None)),
        };
        let c = &mut self.ctrs[i];
        match spawned {
            Ok(sp) => {
                let pid = sp.pid;
                c.pid = Some(pid);
                c.view.container_id = Some(format!("repobox-kubelet://{pid}"));
                c.view.state = CState::Running {
                    started_at: started_at.clone(),
                };
                {
                    let mut st = self.sh.lock();
                    st.started += 1;
                    if let Ok(g) = i32::try_from(pid) {
                        st.groups.insert(g);
                    }
                }
                let tx = self.exits_tx.clone();
                let mut child = sp.child;
                let (out, err) = (sp.stdout, sp.stderr);
                tokio::spawn(async move {
                    let readers = [
                        tokio::spawn(capture(out, log.clone())),
                        tokio::spawn(capture(err, log)),
                    ];
                    let status = child.wait().await;
                    // Anything the process left in its group goes with it.
                    signal_group(pid, Signal::SIGKILL);
                    for r in readers {
                        let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
                    }
                    let (code, signal) = match status {
                        Ok(s) => (
                            s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9)),
                            s.signal(),
                        ),
                        Err(_) => (128, None),
                    };
                    let _ = tx.send((
                        i,
                        ExitInfo {
                            code,
                            signal,
                            finished_at: now(),
                        },
                    ));
                });
                self.sh.emit(KubeletEvent::ContainerStarted {
                    namespace: self.ns.clone(),
                    pod: self.name.clone(),
                    container: c.spec.name.clone(),
                    pid,
                });
            }
            Err((message, stderr)) => {
                let mut detail = String::new();
                if let Some(mut s) = stderr {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        tokio::io::AsyncReadExt::read_to_string(&mut s, &mut detail),
                    )
                    .await;
                }
                let message = match detail.trim() {
                    "" => message,
                    d => format!("{message}: {d}"),
                };
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&format!("{message}\n"));
                c.view.state = CState::Terminated {
                    exit_code: 128,
                    signal: None,
                    reason: "StartError".into(),
                    message: Some(message.clone()),
                    started_at: None,
                    finished_at: now(),
                };
                let exit = ContainerExit {
                    name: c.spec.name.clone(),
                    exit_code: 128,
                    signal: None,
                    reason: "StartError".into(),
                };
                self.error(format!("container {}: {message}", exit.name));
                self.sh.emit(KubeletEvent::ContainerExited {
                    namespace: self.ns.clone(),
                    pod: self.name.clone(),
                    exit,
                });
            }
        }
    }

    fn record_exit(&mut self, i: usize, info: ExitInfo) {
        let c = &mut self.ctrs[i];
        let started_at = match &c.view.state {
            CState::Running { started_at } => Some(started_at.clone()),
            _ => None,
        };
        let reason = status::exit_reason(info.code, c.oom).to_string();
        c.view.state = CState::Terminated {
            exit_code: info.code,
            signal: info.signal,
            reason: reason.clone(),
            message: None,
            started_at,
            finished_at: info.finished_at,
        };
        if let Some(pid) = c.pid
            && let Ok(g) = i32::try_from(pid)
        {
            self.sh.lock().groups.remove(&g);
        }
        self.sh.emit(KubeletEvent::ContainerExited {
            namespace: self.ns.clone(),
            pod: self.name.clone(),
            exit: ContainerExit {
                name: c.spec.name.clone(),
                exit_code: info.code,
                signal: info.signal,
                reason,
            },
        });
    }

    fn grace(&self, end: End) -> Duration {
        let spec_grace = self.spec.termination_grace_period_seconds.unwrap_or(30);
        let secs = match end {
            End::Deleted => self
                .pod
                .metadata
                .deletion_grace_period_seconds
                .unwrap_or(spec_grace),
            End::NodeShutdown => {
                let shutdown = self.shutdown_grace.map_or(spec_grace, |g| {
                    i64::try_from(g.as_secs()).unwrap_or(i64::MAX)
                });
                spec_grace.min(shutdown)
            }
            End::NodeGone => 0,
            _ => spec_grace,
        };
        let g = Duration::from_secs(u64::try_from(secs).unwrap_or(0));
        self.cfg().max_grace_period.map_or(g, |cap| g.min(cap))
    }

    /// SIGTERM every running container's main process, wait the grace period, SIGKILL the rest
    /// (a zero grace period: SIGKILL only, as when the machine dies).
    async fn kill_all(&mut self, grace: Duration) {
        for c in &self.ctrs {
            if !grace.is_zero()
                && c.view.state.is_running()
                && let Some(pid) = c.pid
                && let Ok(p) = i32::try_from(pid)
            {
                let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
                self.sh.emit(KubeletEvent::Sigterm {
                    namespace: self.ns.clone(),
                    pod: self.name.clone(),
                    container: c.spec.name.clone(),
                });
            }
        }
        let running = |w: &Worker| w.ctrs.iter().any(|c| c.view.state.is_running());
        let until = Instant::now() + grace;
        while running(self) {
            tokio::select! {
                Some((i, info)) = self.exits_rx.recv() => self.record_exit(i, info),
                _ = tokio::time::sleep_until(until) => break,
            }
        }
        for c in &self.ctrs {
            if c.view.state.is_running()
                && let Some(pid) = c.pid
            {
                signal_group(pid, Signal::SIGKILL);
            }
        }
        while running(self) {
            match tokio::time::timeout(Duration::from_secs(10), self.exits_rx.recv()).await {
                Ok(Some((i, info))) => self.record_exit(i, info),
                _ => {
                    self.error("containers did not die after SIGKILL".into());
                    break;
                }
            }
        }
    }

    async fn finish(&mut self, end: End) {
        match end {
            End::Completed => {}
            End::Evicted => {
                // The condition lands before the containers stop, as the Eviction API does it.
                self.extra_conditions.push((
                    "DisruptionTarget".into(),
                    "EvictionByEvictionAPI".into(),
                    "Eviction API: evicting".into(),
                ));
                self.write_status().await;
                self.kill_all(self.grace(end)).await;
                self.force_failed = true;
            }
            End::Deadline => {
                self.kill_all(self.grace(end)).await;
                self.failed = Some((
                    "DeadlineExceeded".into(),
                    "Pod was active on the node longer than the specified deadline".into(),
                ));
            }
            End::Terminated => {
                self.kill_all(self.grace(end)).await;
                self.force_failed = true;
            }
            End::NodeShutdown => {
                // As the shutdown manager's status function: the condition lands while the
                // containers still run, the terminal phase once they have stopped.
                self.extra_conditions.push((
                    "DisruptionTarget".into(),
                    "TerminationByKubelet".into(),
                    super::NODE_SHUTDOWN_MESSAGE.into(),
                ));
                self.write_status().await;
                self.kill_all(self.grace(end)).await;
                self.failed = Some(("Terminated".into(), super::NODE_SHUTDOWN_MESSAGE.into()));
            }
            End::Deleted | End::Gone | End::NodeGone => self.kill_all(self.grace(end)).await,
        }
        if self
            .ctrs
            .iter()
            .any(|c| matches!(c.view.state, CState::Waiting { .. }))
        {
            // Never started: a stopped pod still ends in a terminal phase.
            self.force_failed = true;
        }
        if end == End::Gone {
            self.gone = true;
        }
        // This kubelet never restarts a container: the pod is done.
        self.terminal = true;
        self.write_status().await;
        let deleted = matches!(end, End::Deleted | End::Gone);
        if end == End::Deleted
            && !self.gone
            && let Err(e) = delete_now(&self.sh.client, &self.pod).await
        {
            self.error(format!("{e:#}"));
        }
        let view = self.view();
        let exits = |list: &[ContainerView]| -> Vec<ContainerExit> {
            list.iter()
                .filter_map(|c| match &c.state {
                    CState::Terminated {
                        exit_code,
                        signal,
                        reason,
                        ..
                    } => Some(ContainerExit {
                        name: c.name.clone(),
                        exit_code: *exit_code,
                        signal: *signal,
                        reason: reason.clone(),
                    }),
                    _ => None,
                })
                .collect()
        };
        let disruption = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
            })
            .and_then(|c| c.reason.clone())
            .or_else(|| {
                self.extra_conditions
                    .iter()
                    .find(|c| c.0 == "DisruptionTarget")
                    .map(|c| c.1.clone())
            });
        self.sh.emit(KubeletEvent::PodFinished {
            namespace: self.ns.clone(),
            pod: self.name.clone(),
            phase: status::phase_of(&view).to_string(),
            reason: self.failed.as_ref().map(|f| f.0.clone()),
            disruption,
            started: self
                .ctrs
                .iter()
                .any(|c| c.kind == Kind::Main && c.pid.is_some()),
            init: exits(&view.init),
            containers: exits(&view.containers),
            deleted,
        });
    }

    /// Write the status through the status subresource when it changed; the pod's own
    /// resourceVersion guards against overwriting a condition someone else just added.
    async fn write_status(&mut self) {
        if self.gone {
            return;
        }
        let view = self.view();
        let signature = status::pod_status(&view, &[], "");
        if self.last_written.as_ref() == Some(&signature) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.sh.client.clone(), &self.ns);
        for _ in 0..10 {
            let current = match api.get_opt(&self.name).await {
                Ok(Some(p)) if p.uid().as_deref() == Some(self.uid.as_str()) => p,
                Ok(_) => {
                    self.gone = true;
                    return;
                }
                Err(e) => {
                    self.error(format!("get pod: {e}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let existing: Vec<Value> = current
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .map(|cs| {
                    cs.iter()
                        .filter_map(|c| serde_json::to_value(c).ok())
                        .collect()
                })
                .unwrap_or_default();
            let st = status::pod_status(&view, &existing, &now());
            let patch = json!({"metadata": {"resourceVersion": current.resource_version()},
                               "status": st});
            match api
                .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(p) => {
                    self.pod = p;
                    self.last_written = Some(signature);
                    return;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    self.gone = true;
                    return;
                }
                Err(e) => {
                    self.error(format!("pod status: {e}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// Creates the missing `subPath` directories of a container about to start, as the kubelet
/// does at container start (not at pod start: an init container may have made them, owned by
/// its user): with the volume root's mode, group-owned like it (an `fsGroup` volume).
fn make_sub_paths(sub_paths: &[(PathBuf, PathBuf)]) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for (root, dir) in sub_paths {
        if dir.exists() {
            continue;
        }
        let made = std::fs::metadata(root).and_then(|meta| {
            std::fs::create_dir_all(dir)?;
            std::os::unix::fs::chown(dir, None, Some(meta.gid()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
        });
        if let Err(e) = made {
            return Err(format!("subPath {}: {e}", dir.display()));
        }
    }
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn signal_group(pid: u32, signal: Signal) {
    if let Ok(p) = i32::try_from(pid)
        && p > 0
    {
        let _ = killpg(Pid::from_raw(p), signal);
        let _ = kill(Pid::from_raw(p), signal);
    }
}

async fn capture(reader: pipe::Receiver, log: Arc<Mutex<String>>) {
    let mut reader = tokio::io::BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                l.push_str(&text);
                if !text.ends_with('\n') {
                    l.push('\n');
                }
            }
        }
    }
}

/// `fn(path) -> path`: a path under a mount point → the same path under the host volume dir.
fn remapper(mounts: &[MountSpec]) -> impl Fn(&str) -> String + '_ {
    let mut sorted: Vec<&MountSpec> = mounts.iter().collect();
    sorted.sort_by_key(|m| std::cmp::Reverse(m.container.trim_end_matches('/').len()));
    move |value: &str| {
        for m in &sorted {
            let mount = m.container.trim_end_matches('/');
            if value == mount {
                return m.host.display().to_string();
            }
            if let Some(rest) = value.strip_prefix(mount).and_then(|r| r.strip_prefix('/')) {
                return m.host.join(rest).display().to_string();
            }
        }
        value.to_string()
    }
}

/// The image's name without registry, tag or digest: `ghcr.io/x/runner:1` → `runner`.
fn image_name(image: &str) -> String {
    let base = image.rsplit('/').next().unwrap_or(image);
    base.split(['@', ':']).next().unwrap_or(base).to_string()
}

/// A file name for the executable under `/.kubelet/bin`.
fn exe_file_name(arg0: &str) -> String {
    let base = Path::new(arg0)
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    let clean: String = base
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-+".contains(*c))
        .collect();
    if clean.is_empty() || clean.starts_with('.') {
        "entrypoint".into()
    } else {
        clean
    }
}

/// The host executable for a command (or an image): the binaries map by exact name, file name
/// or image name; else an absolute host path, else the system `PATH`.
fn resolve_binary(map: &HashMap<String, PathBuf>, name: &str) -> Result<PathBuf, String> {
    if let Some(p) = map.get(name) {
        return Ok(p.clone());
    }
    let base = Path::new(name)
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    if let Some(p) = map.get(&base) {
        return Ok(p.clone());
    }
    if let Some(p) = map.get(&image_name(name)) {
        return Ok(p.clone());
    }
    let path = Path::new(name);
    if path.is_absolute() && path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !name.is_empty() && !name.contains('/') {
        for dir in SYSTEM_PATH {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(format!(
        "no local binary mapped for {name:?} (KubeletConfig::binaries) and none on the system PATH"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_resolve_by_name_file_and_image() {
        let map = HashMap::from([
            ("repobox-job-runner".to_string(), PathBuf::from("/t/runner")),
            ("fake".to_string(), PathBuf::from("/bin/sh")),
        ]);
        assert_eq!(
            resolve_binary(&map, "/usr/local/bin/repobox-job-runner"),
            Ok(PathBuf::from("/t/runner"))
        );
        assert_eq!(
            resolve_binary(&map, "ghcr.io/repobox/repobox-job-runner:1.2"),
            Ok(PathBuf::from("/t/runner"))
        );
        assert_eq!(resolve_binary(&map, "fake"), Ok(PathBuf::from("/bin/sh")));
        // Unmapped system tools come from the host.
        assert!(resolve_binary(&map, "sh").is_ok_and(|p| p.is_file()));
        assert!(resolve_binary(&map, "no-such-tool-xyz").is_err());
        assert!(resolve_binary(&map, "/nope/tool").is_err());
    }

    #[test]
    fn names() {
        assert_eq!(image_name("ghcr.io/x/runner:1"), "runner");
        assert_eq!(image_name("runner@sha256:abc"), "runner");
        assert_eq!(image_name("busybox"), "busybox");
        assert_eq!(
            exe_file_name("/usr/local/bin/repobox-job-runner"),
            "repobox-job-runner"
        );
        assert_eq!(exe_file_name("../.."), "entrypoint");
        assert_eq!(exe_file_name("a b"), "ab");
    }

    #[test]
    fn remapping_prefers_the_longest_mount() {
        let mounts = vec![
            MountSpec {
                host: "/h/work".into(),
                container: "/work".into(),
                read_only: false,
            },
            MountSpec {
                host: "/h/key".into(),
                container: "/work/secret/".into(),
                read_only: true,
            },
        ];
        let remap = remapper(&mounts);
        assert_eq!(remap("/work"), "/h/work");
        assert_eq!(remap("/work/a/b"), "/h/work/a/b");
        assert_eq!(remap("/work/secret/k"), "/h/key/k");
        assert_eq!(remap("/workshop"), "/workshop");
        assert_eq!(remap("plain"), "plain");
    }
}
