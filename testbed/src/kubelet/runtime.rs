//! Starting a container's process.
//!
//! **Isolated** (root only): the process gets its own mount, PID, UTS and IPC namespaces and a
//! private root, built in the forked child before `exec`:
//!
//! ```text
//! kubelet ─fork─▶ relay (host PID ns; what the kubelet waits for and signals)
//!                   └─fork─▶ container PID 1 (new namespaces): mounts, pivot_root, drop
//!                                identity, no_new_privs ─exec─▶ the container's command
//! ```
//!
//! The root is a tmpfs holding copy-on-write overlays of the host's `/usr`, `/etc` and the lib/bin
//! dirs (like an image's rootfs: writable, changes stay in the container, mount points can be made
//! anywhere; read-only binds where overlayfs is unavailable; Debian's merged-usr symlinks are
//! recreated as symlinks), a fresh `/proc` (with `/proc/sys`
//! read-only), a `/dev` tmpfs with binds of `null zero full random urandom tty` and a `/dev/shm`
//! tmpfs, a private `/tmp` tmpfs (unless a volume is mounted there), the container's volume mounts,
//! and the mapped executable at `/.kubelet/bin/<name>`. The relay forwards SIGTERM & co. to the
//! container's PID 1 and exits with its status; if the relay dies, `PR_SET_PDEATHSIG` kills PID 1
//! and with it the whole PID namespace. The network namespace stays the host's.
//!
//! **Plain** (not root, or isolation off): the command runs as a child in its own process group
//! with paths under mount points remapped to the host volume directories (no isolation).
//!
//! Everything the forked children do is a raw system call on data prepared before `fork`: no
//! allocation, no locks (the parent is multi-threaded).

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicI32, Ordering};

use k8s_openapi::api::core::v1::{PodSecurityContext, SecurityContext};
use nix::libc;
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};

/// Linux capability names, by number.
const CAPS: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// containerd's default capability set for containers.
const DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

fn cap_bit(name: &str) -> Option<u64> {
    let name = name.strip_prefix("CAP_").unwrap_or(name);
    CAPS.iter().position(|c| *c == name).map(|i| 1u64 << i)
}

/// The bounding set a container keeps: containerd's defaults, `drop` (`ALL` empties it), `add`;
/// everything when privileged.
pub(crate) fn capability_set(sc: Option<&SecurityContext>) -> u64 {
    let all = (1u64 << CAPS.len()) - 1;
    if sc.and_then(|s| s.privileged) == Some(true) {
        return all;
    }
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    let drops: Vec<&str> = caps
        .and_then(|c| c.drop.as_ref())
        .map(|d| d.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let adds: Vec<&str> = caps
        .and_then(|c| c.add.as_ref())
        .map(|d| d.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let drop_all = drops.contains(&"ALL");
    let mut set = if drop_all {
        0
    } else {
        DEFAULT_CAPS
            .iter()
            .filter_map(|c| cap_bit(c))
            .fold(0, |a, b| a | b)
    };
    if !drop_all {
        for d in &drops {
            set &= !cap_bit(d).unwrap_or(0);
        }
    }
    for a in &adds {
        set |= if *a == "ALL" {
            all
        } else {
            cap_bit(a).unwrap_or(0)
        };
    }
    set
}

/// Who the container runs as.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Identity {
    /// None: the image's user, taken to be root.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Supplementary groups: the pod's `fsGroup` and `supplementalGroups`.
    pub groups: Vec<u32>,
}

fn id(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

/// The container's identity: its securityContext over the pod's.
pub(crate) fn identity(
    pod: Option<&PodSecurityContext>,
    container: Option<&SecurityContext>,
) -> Identity {
    let uid = id(container
        .and_then(|c| c.run_as_user)
        .or(pod.and_then(|p| p.run_as_user)));
    let gid = id(container
        .and_then(|c| c.run_as_group)
        .or(pod.and_then(|p| p.run_as_group)));
    let mut groups = Vec::new();
    for g in pod
        .and_then(|p| p.fs_group)
        .into_iter()
        .chain(
            pod.and_then(|p| p.supplemental_groups.clone())
                .unwrap_or_default(),
        )
        .filter_map(|g| id(Some(g)))
    {
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    Identity { uid, gid, groups }
}

/// One bind of a volume into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountSpec {
    pub host: PathBuf,
    /// Absolute path in the container.
    pub container: String,
    pub read_only: bool,
}

/// A host directory of the system the root exposes, or a symlink (merged /usr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SystemEntry {
    Dir(String),
    Link { name: String, target: PathBuf },
}

/// `/usr /etc /bin /sbin /lib*` of this host, as directories or symlinks.
pub(crate) fn host_system_entries() -> Vec<SystemEntry> {
    let mut out = Vec::new();
    for name in [
        "usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32",
    ] {
        let path = Path::new("/").join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(&path) {
                    out.push(SystemEntry::Link {
                        name: name.into(),
                        target,
                    });
                }
            }
            Ok(m) if m.is_dir() => out.push(SystemEntry::Dir(name.into())),
            _ => {}
        }
    }
    out
}

/// What to build inside the container's mount namespace (pure data, in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PlanOp {
    Mkdir(PathBuf, u32),
    Touch(PathBuf),
    Symlink {
        target: PathBuf,
        link: PathBuf,
    },
    Bind {
        src: PathBuf,
        dst: PathBuf,
        recursive: bool,
        read_only: bool,
    },
    Tmpfs {
        dst: PathBuf,
        data: String,
        flags: libc::c_ulong,
    },
    Proc(PathBuf),
    /// A copy-on-write view of a host directory (upper and work on the scratch tmpfs).
    Overlay {
        lower: PathBuf,
        upper: PathBuf,
        work: PathBuf,
        dst: PathBuf,
    },
    /// Lazily unmount and remove (the overlays keep their own reference to the scratch tmpfs).
    Detach(PathBuf),
}

/// The sandbox of one container.
#[derive(Debug, Clone)]
pub(crate) struct Sandbox {
    /// An empty host directory: the mount point of the container's root tmpfs (only inside its
    /// mount namespace).
    pub root: PathBuf,
    pub hostname: String,
    pub system: Vec<SystemEntry>,
    pub mounts: Vec<MountSpec>,
    /// File name under `/.kubelet/bin` for the executable.
    pub exe_name: String,
    /// The container's working directory (absolute).
    pub workdir: String,
    pub identity: Identity,
    pub caps: u64,
    pub no_new_privs: bool,
    pub read_only_root: bool,
    /// System dirs as overlays (writable, changes stay in the container, mount points can be
    /// made under them, like an image's rootfs); else read-only binds.
    pub overlay: bool,
}

/// Where the executable appears in the container.
pub(crate) fn exe_path_in_root(exe_name: &str) -> String {
    format!("/.kubelet/bin/{exe_name}")
}

fn under(root: &Path, container_path: &str) -> PathBuf {
    root.join(container_path.trim_start_matches('/'))
}

/// Every directory from the first component below the root down to `path` (container paths).
fn ancestors_of(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        cur.push('/');
        cur.push_str(part);
        out.push(cur.clone());
    }
    out
}

/// The mount plan for a sandbox, given the executable on the host.
pub(crate) fn plan(s: &Sandbox, exe: &Path) -> Vec<PlanOp> {
    let r = &s.root;
    let (nosuid, nodev, noexec) = (libc::MS_NOSUID, libc::MS_NODEV, libc::MS_NOEXEC);
    let mut ops = vec![PlanOp::Tmpfs {
        dst: r.clone(),
        data: "mode=0755".into(),
        flags: nodev,
    }];
    let scratch = r.join(".kubelet/overlay");
    if s.overlay {
        ops.push(PlanOp::Mkdir(r.join(".kubelet"), 0o755));
        ops.push(PlanOp::Mkdir(scratch.clone(), 0o700));
        ops.push(PlanOp::Tmpfs {
            dst: scratch.clone(),
            data: "mode=0700".into(),
            flags: nodev,
        });
    }
    for e in &s.system {
        match e {
            SystemEntry::Dir(name) if s.overlay => {
                let (upper, work) = (
                    scratch.join("upper").join(name),
                    scratch.join("work").join(name),
                );
                for d in [
                    scratch.join("upper"),
                    scratch.join("work"),
                    upper.clone(),
                    work.clone(),
                ] {
                    ops.push(PlanOp::Mkdir(d, 0o755));
                }
                ops.push(PlanOp::Mkdir(r.join(name), 0o755));
                ops.push(PlanOp::Overlay {
                    lower: Path::new("/").join(name),
                    upper,
                    work,
                    dst: r.join(name),
                });
            }
            SystemEntry::Dir(name) => {
                ops.push(PlanOp::Mkdir(r.join(name), 0o755));
                ops.push(PlanOp::Bind {
                    src: Path::new("/").join(name),
                    dst: r.join(name),
                    recursive: true,
                    read_only: true,
                });
            }
            SystemEntry::Link { name, target } => ops.push(PlanOp::Symlink {
                target: target.clone(),
                link: r.join(name),
            }),
        }
    }
    ops.push(PlanOp::Mkdir(r.join("proc"), 0o555));
    ops.push(PlanOp::Proc(r.join("proc")));
    ops.push(PlanOp::Bind {
        src: r.join("proc/sys"),
        dst: r.join("proc/sys"),
        recursive: false,
        read_only: true,
    });
    ops.push(PlanOp::Mkdir(r.join("dev"), 0o755));
    ops.push(PlanOp::Tmpfs {
        dst: r.join("dev"),
        data: "mode=0755".into(),
        flags: nosuid | noexec,
    });
    for dev in ["null", "zero", "full", "random", "urandom", "tty"] {
        let host = Path::new("/dev").join(dev);
        if host.exists() {
            ops.push(PlanOp::Touch(r.join("dev").join(dev)));
            ops.push(PlanOp::Bind {
                src: host,
                dst: r.join("dev").join(dev),
                recursive: false,
                read_only: false,
            });
        }
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ops.push(PlanOp::Symlink {
            target: target.into(),
            link: r.join("dev").join(link),
        });
    }
    ops.push(PlanOp::Mkdir(r.join("dev/shm"), 0o1777));
    ops.push(PlanOp::Tmpfs {
        dst: r.join("dev/shm"),
        data: "mode=1777".into(),
        flags: nosuid | nodev,
    });
    let tmp_is_volume = s
        .mounts
        .iter()
        .any(|m| m.container.trim_end_matches('/') == "/tmp");
    if !tmp_is_volume {
        ops.push(PlanOp::Mkdir(r.join("tmp"), 0o1777));
        ops.push(PlanOp::Tmpfs {
            dst: r.join("tmp"),
            data: "mode=1777".into(),
            flags: nosuid | nodev,
        });
    }
    // Parents before children: a shorter path is mounted first.
    let mut mounts = s.mounts.clone();
    mounts.sort_by_key(|m| m.container.split('/').filter(|p| !p.is_empty()).count());
    for m in &mounts {
        let anc = ancestors_of(&m.container);
        for a in anc.iter().take(anc.len().saturating_sub(1)) {
            ops.push(PlanOp::Mkdir(under(r, a), 0o755));
        }
        let dst = under(r, &m.container);
        if m.host.is_dir() {
            ops.push(PlanOp::Mkdir(dst.clone(), 0o755));
        } else {
            ops.push(PlanOp::Touch(dst.clone()));
        }
        ops.push(PlanOp::Bind {
            src: m.host.clone(),
            dst,
            recursive: true,
            read_only: m.read_only,
        });
    }
    if s.identity.uid.unwrap_or(0) == 0 {
        // root's HOME
        ops.push(PlanOp::Mkdir(r.join("root"), 0o700));
    }
    ops.push(PlanOp::Mkdir(r.join(".kubelet"), 0o755));
    ops.push(PlanOp::Mkdir(r.join(".kubelet/bin"), 0o755));
    let exe_dst = under(r, &exe_path_in_root(&s.exe_name));
    ops.push(PlanOp::Touch(exe_dst.clone()));
    ops.push(PlanOp::Bind {
        src: exe.to_path_buf(),
        dst: exe_dst,
        recursive: false,
        read_only: true,
    });
    for a in ancestors_of(&s.workdir) {
        ops.push(PlanOp::Mkdir(under(r, &a), 0o755));
    }
    if s.overlay {
        ops.push(PlanOp::Detach(scratch));
    }
    ops
}

/// The directories to make read-only for `readOnlyRootFilesystem` (container paths).
fn read_only_targets(s: &Sandbox) -> Vec<String> {
    let mut out = vec!["/".to_string()];
    if s.overlay {
        for e in &s.system {
            if let SystemEntry::Dir(name) = e {
                out.push(format!("/{name}"));
            }
        }
    }
    out
}

/// Whether the kernel offers overlayfs.
pub(crate) fn overlay_available() -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| {
        f.lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
    })
}

/// A syscall-level operation (everything pre-converted to C strings).
enum Op {
    Mkdir(CString, libc::mode_t),
    Touch(CString),
    Symlink(CString, CString),
    Mount {
        src: Option<CString>,
        dst: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    Detach(CString),
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
}

/// The plan as syscalls, each with a description for errors.
fn lower(plan: &[PlanOp]) -> io::Result<Vec<(Op, CString)>> {
    let mut out = Vec::new();
    for op in plan {
        match op {
            PlanOp::Mkdir(p, mode) => out.push((
                Op::Mkdir(cstr(p)?, *mode as libc::mode_t),
                cstring(&format!("mkdir {}", p.display()))?,
            )),
            PlanOp::Touch(p) => out.push((
                Op::Touch(cstr(p)?),
                cstring(&format!("create {}", p.display()))?,
            )),
            PlanOp::Symlink { target, link } => out.push((
                Op::Symlink(cstr(target)?, cstr(link)?),
                cstring(&format!("symlink {}", link.display()))?,
            )),
            PlanOp::Bind {
                src,
                dst,
                recursive,
                read_only,
            } => {
                let rec = if *recursive { libc::MS_REC } else { 0 };
                out.push((
                    Op::Mount {
                        src: Some(cstr(src)?),
                        dst: cstr(dst)?,
                        fstype: None,
                        flags: libc::MS_BIND | rec,
                        data: None,
                    },
                    cstring(&format!("bind {} on {}", src.display(), dst.display()))?,
                ));
                if *read_only {
                    out.push((
                        Op::Mount {
                            src: None,
                            dst: cstr(dst)?,
                            fstype: None,
                            flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                            data: None,
                        },
                        cstring(&format!("remount {} read-only", dst.display()))?,
                    ));
                }
            }
            PlanOp::Tmpfs {
                dst,
                data,
                flags: f,
            } => out.push((
                Op::Mount {
                    src: Some(cstring("tmpfs")?),
                    dst: cstr(dst)?,
                    fstype: Some(cstring("tmpfs")?),
                    flags: *f,
                    data: Some(cstring(data)?),
                },
                cstring(&format!("tmpfs on {}", dst.display()))?,
            )),
            PlanOp::Overlay {
                lower,
                upper,
                work,
                dst,
            } => out.push((
                Op::Mount {
                    src: Some(cstring("overlay")?),
                    dst: cstr(dst)?,
                    fstype: Some(cstring("overlay")?),
                    flags: libc::MS_NODEV,
                    data: Some(cstring(&format!(
                        "lowerdir={},upperdir={},workdir={}",
                        lower.display(),
                        upper.display(),
                        work.display()
                    ))?),
                },
                cstring(&format!("overlay on {}", dst.display()))?,
            )),
            PlanOp::Detach(dst) => out.push((
                Op::Detach(cstr(dst)?),
                cstring(&format!("detach {}", dst.display()))?,
            )),
            PlanOp::Proc(dst) => out.push((
                Op::Mount {
                    src: Some(cstring("proc")?),
                    dst: cstr(dst)?,
                    fstype: Some(cstring("proc")?),
                    flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    data: None,
                },
                cstring(&format!("proc on {}", dst.display()))?,
            )),
        }
    }
    Ok(out)
}

/// Everything the forked children need, prepared before `fork`.
struct Prepared {
    ops: Vec<(Op, CString)>,
    root: CString,
    old_root: CString,
    old_root_inside: CString,
    slash: CString,
    hostname: CString,
    workdir: CString,
    uid: Option<libc::uid_t>,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    caps: u64,
    last_cap: u32,
    no_new_privs: bool,
    read_only: Vec<CString>,
    desc_private: CString,
    desc_pivot: CString,
    desc_ids: CString,
    desc_chdir: CString,
}

impl Prepared {
    fn new(s: &Sandbox, exe: &Path) -> io::Result<Self> {
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(40);
        Ok(Prepared {
            ops: lower(&plan(s, exe))?,
            root: cstr(&s.root)?,
            old_root: cstr(&s.root.join(".oldroot"))?,
            old_root_inside: cstring("/.oldroot")?,
            slash: cstring("/")?,
            hostname: cstring(&s.hostname)?,
            workdir: cstring(&s.workdir)?,
            uid: s.identity.uid,
            gid: s.identity.gid.unwrap_or(0),
            groups: s.identity.groups.clone(),
            caps: s.caps,
            last_cap,
            no_new_privs: s.no_new_privs,
            read_only: if s.read_only_root {
                read_only_targets(s)
                    .iter()
                    .map(|t| cstring(t))
                    .collect::<io::Result<_>>()?
            } else {
                Vec::new()
            },
            desc_private: cstring("make / private")?,
            desc_pivot: cstring("pivot_root")?,
            desc_ids: cstring("set user and groups")?,
            desc_chdir: cstring("chdir to the working directory")?,
        })
    }
}

/// What to run.
pub(crate) struct Launch {
    /// The executable on the host.
    pub exe: PathBuf,
    /// argv[0] as the pod spec wrote it.
    pub arg0: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mode: LaunchMode,
    /// `subPath` directories to create when the container starts (volume root, directory), as
    /// the kubelet does: an init container may create them itself first, with its own owner.
    pub sub_paths: Vec<(PathBuf, PathBuf)>,
}

pub(crate) enum LaunchMode {
    Plain { workdir: PathBuf },
    Isolated(Box<Sandbox>),
}

/// A started container process.
pub(crate) struct Spawned {
    pub child: Child,
    /// The process the kubelet signals: the relay (isolated) or the command itself (plain).
    pub pid: u32,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
}

/// Why a start failed, with what the setup wrote to stderr (if anything).
#[derive(Debug)]
pub(crate) struct StartError {
    pub error: io::Error,
    /// What the setup wrote before failing (None when the pipes could not even be made).
    pub stderr: Option<pipe::Receiver>,
}

fn pipe_pair() -> io::Result<(pipe::Receiver, OwnedFd)> {
    let (r, w) = std::io::pipe()?;
    Ok((
        pipe::Receiver::from_owned_fd(OwnedFd::from(r))?,
        OwnedFd::from(w),
    ))
}

/// Start the process. Stdout and stderr are pipes the caller reads to the end.
pub(crate) fn spawn(launch: &Launch) -> Result<Spawned, Box<StartError>> {
    let (stdout, stdout_w) = pipe_pair().map_err(|e| start_error(e, None))?;
    let (stderr, stderr_w) = pipe_pair().map_err(|e| start_error(e, None))?;
    let mut cmd;
    match &launch.mode {
        LaunchMode::Plain { workdir } => {
            cmd = Command::new(&launch.exe);
            cmd.current_dir(workdir);
        }
        LaunchMode::Isolated(sandbox) => {
            let prepared = Prepared::new(sandbox, &launch.exe).map_err(|e| start_error(e, None))?;
            cmd = Command::new(exe_path_in_root(&sandbox.exe_name));
            // SAFETY: the closure only makes raw system calls on data prepared above (see
            // `child_main`); nothing allocates or takes a lock between fork and exec.
            unsafe {
                cmd.pre_exec(move || child_main(&prepared));
            }
        }
    }
    cmd.arg0(&launch.arg0)
        .args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout_w))
        .stderr(Stdio::from(stderr_w))
        .process_group(0)
        .kill_on_drop(true);
    let spawned = cmd.spawn();
    // Our copies of the write ends must go, or the readers never see EOF.
    drop(cmd);
    match spawned {
        Ok(child) => {
            let pid = child.id().unwrap_or(0);
            Ok(Spawned {
                child,
                pid,
                stdout,
                stderr,
            })
        }
        Err(e) => Err(start_error(e, Some(stderr))),
    }
}

fn start_error(error: io::Error, stderr: Option<pipe::Receiver>) -> Box<StartError> {
    Box::new(StartError { error, stderr })
}

static RELAY_TARGET: AtomicI32 = AtomicI32::new(0);

extern "C" fn relay_signal(sig: libc::c_int) {
    let pid = RELAY_TARGET.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Write `repobox-kubelet: container setup failed: <what>: errno <n>` to stderr, without
/// allocating.
fn report(what: &CString, errno: i32) {
    let mut buf = [0u8; 16];
    let mut n = errno.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    let parts: [&[u8]; 5] = [
        b"repobox-kubelet: container setup failed: ",
        what.as_bytes(),
        b": errno ",
        &buf[i..],
        b"\n",
    ];
    for p in parts {
        // SAFETY: write on fd 2 with a valid buffer.
        unsafe {
            libc::write(2, p.as_ptr().cast(), p.len());
        }
    }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn fail(what: &CString) -> io::Error {
    let e = errno();
    report(what, e);
    io::Error::from_raw_os_error(e)
}

/// Runs in the child of `fork` (pre_exec). Returns only in the container's PID 1, which then
/// execs the command; the relay never returns.
fn child_main(p: &Prepared) -> io::Result<()> {
    // SAFETY: raw system calls on prepared data; see the module doc.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_BLOCK, &all, &mut old);
        let flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if libc::unshare(flags) != 0 {
            let e = errno();
            report(&p.desc_private, e);
            return Err(io::Error::from_raw_os_error(e));
        }
        let pid = libc::fork();
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid > 0 {
            relay(pid);
        }
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        setup_container(p)
    }
}

/// The relay: wait for the container's PID 1, forward signals to it, exit as it did.
unsafe fn relay(child: libc::pid_t) -> ! {
    // SAFETY (whole fn): async-signal-safe calls only.
    unsafe {
        RELAY_TARGET.store(child, Ordering::Relaxed);
        // Close everything but stdio, in particular std's exec-status pipe: spawn() returns as
        // soon as the container execs.
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..1024 {
                libc::close(fd);
            }
        }
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
        ] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = relay_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        let mut status = 0;
        loop {
            let r = libc::waitpid(child, &mut status, 0);
            if r == child {
                break;
            }
            if r < 0 && errno() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(127)
    }
}

/// In the container's PID 1: build the root, enter it, become the container's user.
unsafe fn setup_container(p: &Prepared) -> io::Result<()> {
    // SAFETY (whole fn): raw system calls on prepared C strings.
    unsafe {
        libc::umask(0);
        if libc::mount(
            std::ptr::null(),
            p.slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(fail(&p.desc_private));
        }
        for (op, what) in &p.ops {
            let rc = match op {
                Op::Mkdir(path, mode) => {
                    let rc = libc::mkdir(path.as_ptr(), *mode);
                    if rc != 0 && errno() == libc::EEXIST {
                        0
                    } else {
                        rc
                    }
                }
                Op::Touch(path) => {
                    let fd = libc::open(
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    if fd >= 0 {
                        libc::close(fd);
                        0
                    } else {
                        -1
                    }
                }
                Op::Symlink(target, link) => libc::symlink(target.as_ptr(), link.as_ptr()),
                Op::Detach(path) => {
                    let rc = libc::umount2(path.as_ptr(), libc::MNT_DETACH);
                    libc::rmdir(path.as_ptr());
                    rc
                }
                Op::Mount {
                    src,
                    dst,
                    fstype,
                    flags,
                    data,
                } => libc::mount(
                    src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                    dst.as_ptr(),
                    fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                    *flags,
                    data.as_ref()
                        .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
                ),
            };
            if rc != 0 {
                return Err(fail(what));
            }
        }
        // Enter the root: pivot_root so the host's tree is not even reachable, chroot where the
        // current root cannot be pivoted (an initramfs).
        libc::mkdir(p.old_root.as_ptr(), 0o700);
        if libc::syscall(libc::SYS_pivot_root, p.root.as_ptr(), p.old_root.as_ptr()) == 0 {
            libc::chdir(p.slash.as_ptr());
            if libc::umount2(p.old_root_inside.as_ptr(), libc::MNT_DETACH) != 0 {
                return Err(fail(&p.desc_pivot));
            }
            libc::rmdir(p.old_root_inside.as_ptr());
        } else {
            libc::rmdir(p.old_root.as_ptr());
            if libc::chroot(p.root.as_ptr()) != 0 {
                return Err(fail(&p.desc_pivot));
            }
            libc::chdir(p.slash.as_ptr());
        }
        for path in &p.read_only {
            libc::mount(
                std::ptr::null(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            );
        }
        libc::sethostname(p.hostname.as_ptr(), p.hostname.as_bytes().len());
        libc::umask(0o022);
        for cap in 0..=p.last_cap.min(63) {
            if p.caps & (1u64 << cap) == 0 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        if libc::setgroups(p.groups.len(), p.groups.as_ptr()) != 0
            || libc::setresgid(p.gid, p.gid, p.gid) != 0
        {
            return Err(fail(&p.desc_ids));
        }
        if let Some(uid) = p.uid
            && libc::setresuid(uid, uid, uid) != 0
        {
            return Err(fail(&p.desc_ids));
        }
        if libc::chdir(p.workdir.as_ptr()) != 0 {
            return Err(fail(&p.desc_chdir));
        }
        if p.no_new_privs {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        }
        Ok(())
    }
}

/// Whether this process can build sandboxes (root, and the kernel lets it unshare and mount),
/// and whether with overlays: probed by running `true` in one. `Ok(overlay)`.
pub(crate) async fn probe_isolation(scratch: &Path) -> Result<bool, String> {
    let mut last = String::new();
    for overlay in [overlay_available(), false] {
        match probe(scratch, overlay).await {
            Ok(()) => return Ok(overlay),
            Err(e) => last = e,
        }
        if !overlay {
            break;
        }
    }
    Err(last)
}

async fn probe(scratch: &Path, overlay: bool) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    let true_bin = ["/usr/bin/true", "/bin/true"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or("no `true` binary")?;
    let root = scratch.join(if overlay {
        "probe-overlay"
    } else {
        "probe-bind"
    });
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let launch = Launch {
        sub_paths: Vec::new(),
        exe: true_bin,
        arg0: "true".into(),
        args: vec![],
        env: vec![],
        mode: LaunchMode::Isolated(Box::new(Sandbox {
            root,
            hostname: "probe".into(),
            system: host_system_entries(),
            mounts: vec![],
            exe_name: "true".into(),
            workdir: "/".into(),
            identity: Identity {
                uid: Some(65534),
                gid: Some(65534),
                groups: vec![],
            },
            caps: 0,
            no_new_privs: true,
            read_only_root: false,
            overlay,
        })),
    };
    let mut spawned = match spawn(&launch) {
        Ok(s) => s,
        Err(e) => return Err(e.error.to_string()),
    };
    let status = spawned.child.wait().await.map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        let mut err = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut spawned.stderr, &mut err).await;
        Err(format!(
            "sandbox probe exited with {status}: {}",
            err.trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Instant;
    use tokio::io::AsyncReadExt;

    #[test]
    fn capabilities() {
        let sc =
            |v: serde_json::Value| -> SecurityContext { serde_json::from_value(v).expect("sc") };
        let default = capability_set(None);
        assert_ne!(default & cap_bit("CHOWN").unwrap_or(0), 0);
        assert_eq!(default & cap_bit("SYS_ADMIN").unwrap_or(0), 0);
        assert_eq!(
            capability_set(Some(&sc(json!({"capabilities": {"drop": ["ALL"]}})))),
            0
        );
        let one = capability_set(Some(&sc(
            json!({"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}),
        )));
        assert_eq!(one, 1 << 10);
        let fewer = capability_set(Some(&sc(json!({"capabilities": {"drop": ["CAP_KILL"]}}))));
        assert_eq!(fewer, default & !(1 << 5));
        assert_eq!(
            capability_set(Some(&sc(json!({"privileged": true})))),
            (1u64 << 41) - 1
        );
    }

    #[test]
    fn identity_container_over_pod() {
        let pod: PodSecurityContext = serde_json::from_value(
            json!({"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000, "supplementalGroups": [3000, 2000]}),
        )
        .expect("psc");
        let c: SecurityContext = serde_json::from_value(json!({"runAsUser": 65533})).expect("sc");
        assert_eq!(
            identity(Some(&pod), Some(&c)),
            Identity {
                uid: Some(65533),
                gid: Some(1000),
                groups: vec![2000, 3000]
            }
        );
        assert_eq!(identity(None, None), Identity::default());
    }

    fn sandbox(root: &Path, mounts: Vec<MountSpec>) -> Sandbox {
        Sandbox {
            root: root.to_path_buf(),
            hostname: "pod".into(),
            system: vec![
                SystemEntry::Dir("usr".into()),
                SystemEntry::Link {
                    name: "bin".into(),
                    target: "usr/bin".into(),
                },
            ],
            mounts,
            exe_name: "runner".into(),
            workdir: "/work/tree".into(),
            identity: Identity::default(),
            caps: 0,
            no_new_privs: true,
            read_only_root: false,
            overlay: false,
        }
    }

    #[test]
    fn the_plan_builds_a_private_root() {
        let tmp = tempfile::tempdir().expect("tmp");
        let vol = tmp.path().join("vol");
        std::fs::create_dir(&vol).expect("vol");
        let file = tmp.path().join("key");
        std::fs::write(&file, "k").expect("file");
        let r = Path::new("/r");
        let ops = plan(
            &sandbox(
                r,
                vec![
                    MountSpec {
                        host: file.clone(),
                        container: "/etc/repobox/key".into(),
                        read_only: true,
                    },
                    MountSpec {
                        host: vol.clone(),
                        container: "/work".into(),
                        read_only: false,
                    },
                ],
            ),
            Path::new("/host/runner"),
        );
        assert!(matches!(&ops[0], PlanOp::Tmpfs { dst, .. } if dst == r));
        assert!(ops.contains(&PlanOp::Symlink {
            target: "usr/bin".into(),
            link: r.join("bin")
        }));
        assert!(ops.contains(&PlanOp::Bind {
            src: "/usr".into(),
            dst: r.join("usr"),
            recursive: true,
            read_only: true
        }));
        assert!(ops.contains(&PlanOp::Proc(r.join("proc"))));
        // A private /tmp, since no volume is mounted there.
        assert!(
            ops.iter()
                .any(|o| matches!(o, PlanOp::Tmpfs { dst, .. } if dst == &r.join("tmp")))
        );
        // /work (depth 1) is mounted before /etc/repobox/key (depth 3); a file gets a file.
        let pos = |pred: &dyn Fn(&PlanOp) -> bool| ops.iter().position(pred).expect("op");
        let work = pos(&|o| matches!(o, PlanOp::Bind { dst, .. } if dst == &r.join("work")));
        let key = pos(
            &|o| matches!(o, PlanOp::Bind { dst, read_only: true, .. } if dst == &r.join("etc/repobox/key")),
        );
        assert!(work < key);
        assert!(ops.contains(&PlanOp::Touch(r.join("etc/repobox/key"))));
        assert!(ops.contains(&PlanOp::Mkdir(r.join("etc/repobox"), 0o755)));
        assert!(ops.contains(&PlanOp::Bind {
            src: "/host/runner".into(),
            dst: r.join(".kubelet/bin/runner"),
            recursive: false,
            read_only: true
        }));
        assert_eq!(ops.last(), Some(&PlanOp::Mkdir(r.join("work/tree"), 0o755)));
        // Nothing of the host's other trees.
        for o in &ops {
            if let PlanOp::Bind { src, .. } = o {
                assert!(
                    !src.starts_with("/work") && !src.starts_with("/root"),
                    "{o:?}"
                );
            }
        }
        // A volume on /tmp replaces the private tmpfs.
        let ops = plan(
            &sandbox(
                r,
                vec![MountSpec {
                    host: vol,
                    container: "/tmp".into(),
                    read_only: false,
                }],
            ),
            Path::new("/host/runner"),
        );
        assert!(
            !ops.iter()
                .any(|o| matches!(o, PlanOp::Tmpfs { dst, .. } if dst == &r.join("tmp")))
        );
    }

    #[test]
    fn overlays_replace_read_only_binds() {
        let r = Path::new("/r");
        let mut sb = sandbox(r, vec![]);
        sb.overlay = true;
        sb.read_only_root = true;
        let ops = plan(&sb, Path::new("/host/runner"));
        let scratch = r.join(".kubelet/overlay");
        assert!(ops.contains(&PlanOp::Overlay {
            lower: "/usr".into(),
            upper: scratch.join("upper/usr"),
            work: scratch.join("work/usr"),
            dst: r.join("usr"),
        }));
        assert!(
            !ops.iter()
                .any(|o| matches!(o, PlanOp::Bind { src, .. } if src == Path::new("/usr")))
        );
        // The scratch space goes before the root is entered; the overlay stays.
        assert_eq!(ops.last(), Some(&PlanOp::Detach(scratch)));
        assert_eq!(read_only_targets(&sb), ["/", "/usr"]);
    }

    async fn run(launch: &Launch) -> (i32, String) {
        let mut s = spawn(launch).unwrap_or_else(|e| panic!("spawn: {:?}", e.error));
        let mut out = String::new();
        let mut err = String::new();
        let status = s.child.wait().await.expect("wait");
        s.stdout.read_to_string(&mut out).await.expect("stdout");
        s.stderr.read_to_string(&mut err).await.expect("stderr");
        (status.code().unwrap_or(-1), format!("{out}{err}"))
    }

    /// Starts a sandboxed shell and checks what it sees; prints the start-up cost of a sandbox
    /// against a plain process (`true`, 20 runs each).
    #[tokio::test]
    async fn sandbox_isolates_and_costs_little() {
        let scratch = tempfile::tempdir().expect("tmp");
        let overlay = match probe_isolation(scratch.path()).await {
            Ok(o) => o,
            Err(why) => {
                println!(
                    "SKIPPED: container isolation needs root with mount/PID namespaces ({why})"
                );
                return;
            }
        };
        let vol = scratch.path().join("vol");
        std::fs::create_dir(&vol).expect("vol");
        std::fs::write(vol.join("hello"), "from the host\n").expect("write");
        let sb = |root: &str, mounts: Vec<MountSpec>| {
            let root = scratch.path().join(root);
            std::fs::create_dir_all(&root).expect("root");
            Sandbox {
                root,
                hostname: "sandboxed".into(),
                system: host_system_entries(),
                mounts,
                exe_name: "sh".into(),
                workdir: "/data".into(),
                identity: Identity {
                    uid: Some(65533),
                    gid: Some(65533),
                    groups: vec![2000],
                },
                caps: capability_set(None),
                no_new_privs: true,
                read_only_root: false,
                overlay,
            }
        };
        let script = "id -u; id -G; pwd; hostname; cat hello; ls /proc | grep -c '^[0-9]'; \
                      ls -d /work /root 2>&1; grep NoNewPrivs /proc/self/status; \
                      { echo x > hello; } 2>/dev/null || echo read-only; \
                      cat /etc/repobox-kubelet-test/hello 2>/dev/null; echo $$";
        let mut mounts = vec![MountSpec {
            host: vol.clone(),
            container: "/data".into(),
            read_only: true,
        }];
        if overlay {
            // A mount point under /etc: made in the container's overlay, not on the host.
            mounts.push(MountSpec {
                host: vol.clone(),
                container: "/etc/repobox-kubelet-test".into(),
                read_only: true,
            });
        }
        let launch = Launch {
            sub_paths: Vec::new(),
            exe: "/bin/sh".into(),
            arg0: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            mode: LaunchMode::Isolated(Box::new(sb("c1", mounts))),
        };
        let (code, out) = run(&launch).await;
        assert_eq!(code, 0, "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "65533", "{out}");
        assert_eq!(lines[1], "65533 2000", "{out}");
        assert_eq!(lines[2], "/data", "{out}");
        assert_eq!(lines[3], "sandboxed", "{out}");
        assert_eq!(lines[4], "from the host", "{out}");
        // Only the shell and the `ls` (and the pipeline's grep) exist in the PID namespace.
        let procs: usize = lines[5].parse().expect("count");
        assert!(procs <= 3, "{out}");
        assert!(out.contains("'/work': No such file or directory"), "{out}");
        assert!(out.contains("'/root': No such file or directory"), "{out}");
        assert!(out.contains("NoNewPrivs:\t1"), "{out}");
        assert!(out.contains("read-only"), "{out}");
        if overlay {
            assert_eq!(out.matches("from the host").count(), 2, "{out}");
            assert!(!Path::new("/etc/repobox-kubelet-test").exists());
        }
        assert_eq!(lines.last(), Some(&"1"), "the command is PID 1: {out}");

        // A failing setup is reported with what failed.
        let bad = Launch {
            sub_paths: Vec::new(),
            exe: "/bin/sh".into(),
            arg0: "sh".into(),
            args: vec![],
            env: vec![],
            mode: LaunchMode::Isolated(Box::new(sb(
                "c2",
                vec![MountSpec {
                    host: scratch.path().join("missing"),
                    container: "/x".into(),
                    read_only: false,
                }],
            ))),
        };
        let Err(err) = spawn(&bad) else {
            panic!("a sandbox with a missing volume must not start")
        };
        let mut msg = String::new();
        let mut stderr = err.stderr.expect("stderr pipe");
        stderr.read_to_string(&mut msg).await.expect("stderr");
        assert!(msg.contains("container setup failed: bind"), "{msg}");

        // Overhead: `true` in a sandbox vs plain.
        let true_bin: PathBuf = ["/usr/bin/true", "/bin/true"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("true");
        let mut timings = Vec::new();
        for isolated in [false, true] {
            let start = Instant::now();
            for i in 0..20 {
                let mode = if isolated {
                    let mut s = sb(&format!("t{i}"), vec![]);
                    s.exe_name = "true".into();
                    s.workdir = "/".into();
                    LaunchMode::Isolated(Box::new(s))
                } else {
                    LaunchMode::Plain {
                        workdir: scratch.path().to_path_buf(),
                    }
                };
                let l = Launch {
                    sub_paths: Vec::new(),
                    exe: true_bin.clone(),
                    arg0: "true".into(),
                    args: vec![],
                    env: vec![],
                    mode,
                };
                let (code, out) = run(&l).await;
                assert_eq!(code, 0, "{out}");
            }
            timings.push(start.elapsed().as_secs_f64() * 1000.0 / 20.0);
        }
        println!(
            "container start+exit of `true`: plain {:.2} ms, isolated {:.2} ms (mean of 20)",
            timings[0], timings[1]
        );
    }
}
