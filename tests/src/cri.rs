//! A Kubernetes CRI client (gRPC, runtime v1) on containerd's socket, as a
//! kubelet would use it: pods with RuntimeClass handler `husk`, containers,
//! ExecSync, stats. Blocking wrappers over tonic, one runtime per client.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

/// The RuntimeClass handler the harness maps to husk.
pub const HANDLER: &str = "husk";

pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// How a test pod is made.
#[derive(Clone, Debug)]
pub struct PodOpts {
    pub name: String,
    pub hostname: String,
    pub share_pid: bool,
    pub host_network: bool,
    pub log_dir: PathBuf,
    pub sysctls: HashMap<String, String>,
    pub handler: String,
    /// The pod's cgroup parent, as kubelet's cgroupfs driver writes it.
    pub cgroup_parent: String,
    /// The pod's resources (kubelet 1.23+ sums its containers' limits).
    pub resources: Option<LinuxContainerResources>,
    /// hostPort mappings (CNI's portmap plugin).
    pub port_mappings: Vec<PortMapping>,
    /// The pod's annotations (the harness's containerd passes every one
    /// through to the runtime, as an operator's `pod_annotations = ["*"]`).
    pub annotations: HashMap<String, String>,
}

impl PodOpts {
    pub fn new(name: &str, log_dir: &Path) -> Self {
        Self {
            name: name.to_owned(),
            hostname: name.to_owned(),
            share_pid: false,
            host_network: false,
            log_dir: log_dir.to_path_buf(),
            sysctls: HashMap::new(),
            handler: HANDLER.to_owned(),
            cgroup_parent: String::new(),
            resources: None,
            port_mappings: Vec::new(),
            annotations: HashMap::new(),
        }
    }

    pub fn config(&self) -> PodSandboxConfig {
        let mode = |pod: bool| {
            if pod {
                NamespaceMode::Pod as i32
            } else {
                NamespaceMode::Container as i32
            }
        };
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.clone(),
                uid: format!("uid-{}", self.name),
                namespace: "husk-e2e".into(),
                attempt: 0,
            }),
            hostname: self.hostname.clone(),
            log_directory: self.log_dir.display().to_string(),
            port_mappings: self.port_mappings.clone(),
            annotations: self.annotations.clone(),
            dns_config: Some(DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["husk-e2e.svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: if self.host_network {
                            NamespaceMode::Node as i32
                        } else {
                            NamespaceMode::Pod as i32
                        },
                        pid: mode(self.share_pid),
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                sysctls: self.sysctls.clone(),
                cgroup_parent: self.cgroup_parent.clone(),
                resources: self.resources.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// RunPodSandbox that must succeed; containerd's log on failure.
pub fn start_pod(ctd: &crate::containerd::Containerd, cri: &Cri, opts: &PodOpts) -> String {
    cri.run_pod(opts)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctd.log()))
}

/// A container of a test pod.
pub fn container(name: &str, image: &str, args: &[&str], share_pid: bool) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        args: args.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: if share_pid {
                        NamespaceMode::Pod as i32
                    } else {
                        NamespaceMode::Container as i32
                    },
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `c` with capabilities `caps` added to its security context.
pub fn with_caps(mut c: ContainerConfig, caps: &[&str]) -> ContainerConfig {
    if let Some(ctx) = c.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
        ctx.capabilities = Some(k8s_cri::v1::Capability {
            add_capabilities: caps.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
    }
    c
}

/// What ExecSync returned.
#[derive(Debug, Clone)]
pub struct ExecResult {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

impl Cri {
    pub fn connect(socket: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(
                Endpoint::from_static("http://[::]:50051")
                    .timeout(Duration::from_secs(120))
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    })),
            )
            .expect("connect to containerd's CRI socket");
        Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }

    pub fn version(&self) -> Result<VersionResponse, tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.version(VersionRequest::default()))
            .map(|r| r.into_inner())
    }

    pub fn image_present(&self, image: &str) -> bool {
        let mut c = self.images.clone();
        self.rt
            .block_on(c.image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.to_owned(),
                    ..Default::default()
                }),
                verbose: false,
            }))
            .is_ok_and(|r| r.into_inner().image.is_some())
    }

    pub fn run_pod(&self, opts: &PodOpts) -> Result<String, tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(opts.config()),
                runtime_handler: opts.handler.clone(),
            }))
            .map(|r| r.into_inner().pod_sandbox_id)
    }

    pub fn create_container(
        &self,
        pod: &str,
        opts: &PodOpts,
        config: ContainerConfig,
    ) -> Result<String, tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.to_owned(),
                config: Some(config),
                sandbox_config: Some(opts.config()),
            }))
            .map(|r| r.into_inner().container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.start_container(StartContainerRequest {
                container_id: id.to_owned(),
            }))
            .map(drop)
    }

    /// Creates and starts a container; returns its id.
    pub fn run_container(
        &self,
        pod: &str,
        opts: &PodOpts,
        config: ContainerConfig,
    ) -> Result<String, tonic::Status> {
        let id = self.create_container(pod, opts, config)?;
        self.start_container(&id)?;
        Ok(id)
    }

    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_s: i64,
    ) -> Result<ExecResult, tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.exec_sync(ExecSyncRequest {
                container_id: id.to_owned(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout_s,
            }))
            .map(|r| {
                let r = r.into_inner();
                ExecResult {
                    stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
                    exit_code: r.exit_code,
                }
            })
    }

    /// `sh -c cmd` in container `id` through ExecSync, which must exit 0
    /// within `timeout_s`; returns stdout.
    pub fn sh(&self, id: &str, cmd: &str, timeout_s: i64) -> String {
        let r = self
            .exec_sync(id, &["sh", "-c", cmd], timeout_s)
            .unwrap_or_else(|e| panic!("exec {cmd:?} in {id}: {e}"));
        assert_eq!(r.exit_code, 0, "exec {cmd:?} in {id}: {r:?}");
        r.stdout
    }

    /// Waits until container `id` has exited; its exit code, or None at
    /// the timeout.
    pub fn wait_exited(&self, id: &str, timeout: std::time::Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let s = self.container_status(id).expect("ContainerStatus");
            if s.state == k8s_cri::v1::ContainerState::ContainerExited as i32 {
                return Some(s.exit_code);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    pub fn container_status(&self, id: &str) -> Result<ContainerStatus, tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.container_status(ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            }))
            .map(|r| r.into_inner().status.unwrap_or_default())
    }

    pub fn container_stats(&self, id: &str) -> Result<ContainerStats, tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.container_stats(ContainerStatsRequest {
                container_id: id.to_owned(),
            }))
            .map(|r| r.into_inner().stats.unwrap_or_default())
    }

    pub fn list_container_stats(&self) -> Result<Vec<ContainerStats>, tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.list_container_stats(ListContainerStatsRequest::default()))
            .map(|r| r.into_inner().stats)
    }

    pub fn update_resources(
        &self,
        id: &str,
        linux: LinuxContainerResources,
    ) -> Result<(), tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(
                c.update_container_resources(UpdateContainerResourcesRequest {
                    container_id: id.to_owned(),
                    linux: Some(linux),
                    ..Default::default()
                }),
            )
            .map(drop)
    }

    pub fn stop_container(&self, id: &str, timeout_s: i64) -> Result<(), tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.stop_container(StopContainerRequest {
                container_id: id.to_owned(),
                timeout: timeout_s,
            }))
            .map(drop)
    }

    pub fn remove_container(&self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.remove_container(RemoveContainerRequest {
                container_id: id.to_owned(),
            }))
            .map(drop)
    }

    pub fn pod_stats(&self, id: &str) -> Result<PodSandboxStats, tonic::Status> {
        let mut c = self.runtime.clone();
        let r = self
            .rt
            .block_on(c.pod_sandbox_stats(PodSandboxStatsRequest {
                pod_sandbox_id: id.to_owned(),
            }))?;
        r.into_inner()
            .stats
            .ok_or_else(|| tonic::Status::not_found("no stats in the answer"))
    }

    pub fn pod_status(&self, id: &str) -> Result<PodSandboxStatus, tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: false,
            }))
            .map(|r| r.into_inner().status.unwrap_or_default())
    }

    /// The network namespace containerd made for pod `id` (from the
    /// runtime spec in its verbose status).
    pub fn pod_netns(&self, id: &str) -> Result<PathBuf, tonic::Status> {
        let mut c = self.runtime.clone();
        let info = self
            .rt
            .block_on(c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: true,
            }))?
            .into_inner()
            .info;
        let verbose: serde_json::Value = info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .ok_or_else(|| tonic::Status::not_found("no verbose info"))?;
        verbose
            .pointer("/runtimeSpec/linux/namespaces")
            .and_then(|n| n.as_array())
            .and_then(|ns| {
                ns.iter()
                    .find(|n| n["type"] == "network")
                    .and_then(|n| n["path"].as_str())
            })
            .map(PathBuf::from)
            .ok_or_else(|| tonic::Status::not_found("no network namespace path in the pod's spec"))
    }

    pub fn stop_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }))
            .map(drop)
    }

    pub fn remove_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }))
            .map(drop)
    }

    /// Stops and removes every pod this containerd knows (test cleanup).
    pub fn remove_all_pods(&self) {
        let mut c = self.runtime.clone();
        let pods = self
            .rt
            .block_on(c.list_pod_sandbox(ListPodSandboxRequest::default()))
            .map(|r| r.into_inner().items)
            .unwrap_or_default();
        for p in pods {
            let _ = self.stop_pod(&p.id);
            let _ = self.remove_pod(&p.id);
        }
    }
}

/// A container of a test pod whose stdin stays open for Attach, with a
/// terminal if `tty`; with `stdin_once`, the first Attach session to end
/// closes its stdin.
pub fn interactive_container(
    name: &str,
    image: &str,
    args: &[&str],
    tty: bool,
    stdin_once: bool,
) -> ContainerConfig {
    ContainerConfig {
        stdin: true,
        stdin_once,
        tty,
        ..container(name, image, args, false)
    }
}

/// Streaming calls: each returns a URL on containerd's streaming server
/// for [`crate::stream::Session`]. Stdout is always streamed; stderr unless
/// `tty` (a terminal merges it, and CRI refuses both).
impl Cri {
    /// PortForward to `ports` of pod `pod`.
    pub fn port_forward(&self, pod: &str, ports: &[i32]) -> Result<String, tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.port_forward(PortForwardRequest {
                pod_sandbox_id: pod.to_owned(),
                port: ports.to_vec(),
            }))
            .map(|r| r.into_inner().url)
    }

    pub fn exec(
        &self,
        id: &str,
        cmd: &[&str],
        tty: bool,
        stdin: bool,
    ) -> Result<String, tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.exec(ExecRequest {
                container_id: id.to_owned(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                tty,
                stdin,
                stdout: true,
                stderr: !tty,
            }))
            .map(|r| r.into_inner().url)
    }

    pub fn attach(&self, id: &str, tty: bool, stdin: bool) -> Result<String, tonic::Status> {
        let mut c = self.runtime.clone();
        self.rt
            .block_on(c.attach(AttachRequest {
                container_id: id.to_owned(),
                stdin,
                tty,
                stdout: true,
                stderr: !tty,
            }))
            .map(|r| r.into_inner().url)
    }
}
