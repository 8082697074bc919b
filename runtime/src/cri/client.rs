//! A blocking CRI client over the node's Unix socket: the few RuntimeService and
//! ImageService calls the CRI checks make, each with a deadline.
//!
//! The self-test engine is synchronous (probe threads), so each client owns a small
//! current-thread tokio runtime and blocks on it; a client lives for one check.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerStatus, ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest,
    ImageSpec, ImageStatusRequest, ListPodSandboxRequest, PodSandbox, PodSandboxConfig, PodSandboxFilter,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StatusRequest,
    StopPodSandboxRequest, VersionRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// `sun_path` holds 107 bytes and a NUL; longer socket paths (a deep host root) are reached
/// through `/proc/self/fd/N` of an `O_PATH` descriptor.
const SUN_PATH_MAX: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to the CRI socket {socket}: {message}")]
    Connect { socket: PathBuf, message: String },
    #[error("CRI {call} failed: {message}")]
    Call { call: &'static str, message: String },
    #[error("CRI {call} did not answer within {after:?}")]
    Timeout { call: &'static str, after: Duration },
    #[error("starting the CRI client: {0}")]
    Runtime(#[source] std::io::Error),
}

impl CriError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, CriError::Timeout { .. })
    }
}

/// What `Version` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeVersion {
    /// `containerd`, `cri-o`.
    pub name: String,
    pub version: String,
}

/// One runtime handler as `Status` reports it; `user_namespaces` is `None` when the handler
/// carries no features at all (containerd could not introspect its runtime).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerFeatures {
    pub name: String,
    pub user_namespaces: Option<bool>,
}

/// A connection to one CRI socket.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    timeout: Duration,
}

impl std::fmt::Debug for CriClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriClient")
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn status_text(s: &tonic::Status) -> String {
    let msg = s.message().trim();
    if msg.is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {msg}", s.code())
    }
}

impl CriClient {
    /// Connects to `socket` (a path this process can open); every later call is bounded by
    /// `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<CriClient, CriError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async {
                Endpoint::try_from("http://cri.invalid")
                    .expect("static URI")
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move { connect_unix(&path).await.map(TokioIo::new) }
                    }))
                    .await
            })
            .map_err(|e| CriError::Connect {
                socket: socket.to_path_buf(),
                message: error_chain(&e),
            })?;
        Ok(CriClient {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            timeout,
        })
    }

    fn call<T>(
        &mut self,
        call: &'static str,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CriError> {
        let timeout = self.timeout;
        self.rt.block_on(async {
            match tokio::time::timeout(timeout, fut).await {
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(s)) if s.code() == tonic::Code::DeadlineExceeded => {
                    Err(CriError::Timeout { call, after: timeout })
                }
                Ok(Err(s)) => Err(CriError::Call {
                    call,
                    message: status_text(&s),
                }),
                Err(_) => Err(CriError::Timeout { call, after: timeout }),
            }
        })
    }

    pub fn version(&mut self) -> Result<RuntimeVersion, CriError> {
        let mut svc = self.runtime.clone();
        let v = self.call("Version", svc.version(VersionRequest { version: "v1".into() }))?;
        Ok(RuntimeVersion {
            name: v.runtime_name,
            version: v.runtime_version,
        })
    }

    /// The handlers and the user-namespace feature the runtime reports for each.
    pub fn runtime_handlers(&mut self) -> Result<Vec<HandlerFeatures>, CriError> {
        let mut svc = self.runtime.clone();
        let s = self.call("Status", svc.status(StatusRequest { verbose: false }))?;
        Ok(s.runtime_handlers
            .into_iter()
            .map(|h| HandlerFeatures {
                name: h.name,
                user_namespaces: h.features.map(|f| f.user_namespaces),
            })
            .collect())
    }

    /// `Status` with `verbose`: the handlers with their user-namespace feature, and the
    /// effective CRI config the runtime reports in `info["config"]` (containerd 1.6 and
    /// 2.x; it lists `containerd.runtimes` even where `runtime_handlers` is empty).
    pub fn status_verbose(&mut self) -> Result<(Vec<HandlerFeatures>, Option<serde_json::Value>), CriError> {
        let mut svc = self.runtime.clone();
        let s = self.call("Status", svc.status(StatusRequest { verbose: true }))?;
        let config = s.info.get("config").and_then(|c| serde_json::from_str(c).ok());
        let handlers = s
            .runtime_handlers
            .into_iter()
            .map(|h| HandlerFeatures {
                name: h.name,
                user_namespaces: h.features.map(|f| f.user_namespaces),
            })
            .collect();
        Ok((handlers, config))
    }

    /// Whether `image` is present on the node (the checks never pull).
    pub fn image_present(&mut self, image: &str) -> Result<bool, CriError> {
        let mut svc = self.images.clone();
        let s = self.call(
            "ImageStatus",
            svc.image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.to_owned(),
                    ..ImageSpec::default()
                }),
                verbose: false,
            }),
        )?;
        Ok(s.image.is_some())
    }

    pub fn run_pod_sandbox(&mut self, config: &PodSandboxConfig, handler: &str) -> Result<String, CriError> {
        let mut svc = self.runtime.clone();
        let r = self.call(
            "RunPodSandbox",
            svc.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.to_owned(),
            }),
        )?;
        Ok(r.pod_sandbox_id)
    }

    pub fn create_container(
        &mut self,
        pod: &str,
        config: ContainerConfig,
        sandbox: &PodSandboxConfig,
    ) -> Result<String, CriError> {
        let mut svc = self.runtime.clone();
        let r = self.call(
            "CreateContainer",
            svc.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.to_owned(),
                config: Some(config),
                sandbox_config: Some(sandbox.clone()),
            }),
        )?;
        Ok(r.container_id)
    }

    pub fn start_container(&mut self, id: &str) -> Result<(), CriError> {
        let mut svc = self.runtime.clone();
        self.call(
            "StartContainer",
            svc.start_container(StartContainerRequest {
                container_id: id.to_owned(),
            }),
        )?;
        Ok(())
    }

    pub fn container_status(&mut self, id: &str) -> Result<ContainerStatus, CriError> {
        let mut svc = self.runtime.clone();
        let r = self.call(
            "ContainerStatus",
            svc.container_status(ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            }),
        )?;
        Ok(r.status.unwrap_or_default())
    }

    /// Runs `cmd` in a running container and returns its exit code, stdout and stderr.
    pub fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<(i32, Vec<u8>, Vec<u8>), CriError> {
        let mut svc = self.runtime.clone();
        let saved = self.timeout;
        // The command's own deadline, plus the call's.
        self.timeout = timeout + saved;
        let r = self.call(
            "ExecSync",
            svc.exec_sync(ExecSyncRequest {
                container_id: id.to_owned(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout.as_secs() as i64,
            }),
        );
        self.timeout = saved;
        let r = r?;
        Ok((r.exit_code, r.stdout, r.stderr))
    }

    /// Stops and removes a pod sandbox and its containers.
    pub fn remove_pod(&mut self, pod: &str) -> Result<(), CriError> {
        let mut svc = self.runtime.clone();
        self.call(
            "StopPodSandbox",
            svc.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.to_owned(),
            }),
        )?;
        let mut svc = self.runtime.clone();
        self.call(
            "RemovePodSandbox",
            svc.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.to_owned(),
            }),
        )?;
        Ok(())
    }

    pub fn list_pods(&mut self, labels: HashMap<String, String>) -> Result<Vec<PodSandbox>, CriError> {
        let mut svc = self.runtime.clone();
        let r = self.call(
            "ListPodSandbox",
            svc.list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: labels,
                    ..PodSandboxFilter::default()
                }),
            }),
        )?;
        Ok(r.items)
    }
}

async fn connect_unix(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return tokio::net::UnixStream::connect(path).await;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)?;
    let short = format!("/proc/self/fd/{}", file.as_raw_fd());
    let stream = tokio::net::UnixStream::connect(&short).await;
    drop(file);
    stream
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}
