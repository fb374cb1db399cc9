//! Kubeconfig handling as kubectl does it: `--kubeconfig`, else the files in `KUBECONFIG`,
//! else `~/.kube/config`; `--context`, else `current-context`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::Args;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Bound for establishing a connection to an API server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for one response; meshctl makes no watches, and its lists are small.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// kubectl's `--kubeconfig` and `--context`.
#[derive(Args, Debug, Clone, Default)]
pub struct KubeArgs {
    /// The kubeconfig file [default: the files in $KUBECONFIG, else ~/.kube/config].
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context of this cluster [default: the current context].
    #[arg(long, global = true, value_name = "CONTEXT")]
    pub context: Option<String>,
}

/// One cluster as a kubeconfig context names it.
#[derive(Clone)]
pub struct Target {
    /// The context's name.
    pub context: String,
    /// The API server's URL, as in the kubeconfig.
    pub server: String,
    /// The PEM CA bundle of the API server, base64-encoded (from `certificate-authority-data`,
    /// or the file `certificate-authority` names); `None` means the system roots.
    pub ca_data: Option<String>,
    /// A client with the context's credentials.
    pub client: Client,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("context", &self.context)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Reads the kubeconfig: `--kubeconfig`, else `KUBECONFIG` (a list of files, merged), else
/// `~/.kube/config`.
///
/// # Errors
/// When the file is missing or does not parse.
pub fn load(args: &KubeArgs) -> Result<Kubeconfig> {
    match &args.kubeconfig {
        Some(path) => Kubeconfig::read_from(path)
            .with_context(|| format!("reading kubeconfig {}", path.display())),
        None => {
            Kubeconfig::read().context("reading the kubeconfig ($KUBECONFIG or ~/.kube/config)")
        }
    }
}

/// The kubeconfig ([`load`]) and the context to use in it ([`current_context`]).
///
/// # Errors
/// When the kubeconfig cannot be read or no context is chosen.
pub fn load_with_context(args: &KubeArgs) -> Result<(Kubeconfig, String)> {
    let kubeconfig = load(args)?;
    let context = current_context(&kubeconfig, args.context.as_deref())?;
    Ok((kubeconfig, context))
}

/// The cluster of the context to use: `--context`, else the kubeconfig's `current-context`.
///
/// # Errors
/// As [`load_with_context`] and [`target`].
pub async fn current_target(args: &KubeArgs) -> Result<Target> {
    let (kubeconfig, context) = load_with_context(args)?;
    target(&kubeconfig, &context).await
}

/// The context to use: the flag's, else the kubeconfig's `current-context`.
///
/// # Errors
/// When neither is set.
pub fn current_context(kubeconfig: &Kubeconfig, flag: Option<&str>) -> Result<String> {
    flag.map(str::to_owned)
        .or_else(|| kubeconfig.current_context.clone())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| anyhow!("the kubeconfig has no current-context; pass --context"))
}

/// The cluster of `context`: its URL, CA and a client.
///
/// # Errors
/// When the context or its cluster is not in the kubeconfig, or the client cannot be built
/// (unreadable CA or key file, bad URL).
pub async fn target(kubeconfig: &Kubeconfig, context: &str) -> Result<Target> {
    let named = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context)
        .ok_or_else(|| {
            anyhow!(
                "context {context:?} is not in the kubeconfig (it has: {})",
                kubeconfig
                    .contexts
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let cluster_name = named
        .context
        .as_ref()
        .map(|c| c.cluster.as_str())
        .ok_or_else(|| anyhow!("context {context:?} names no cluster"))?;
    let cluster = kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.as_ref())
        .ok_or_else(|| {
            anyhow!("cluster {cluster_name:?} of context {context:?} is not in the kubeconfig")
        })?;
    let server = cluster
        .server
        .clone()
        .ok_or_else(|| anyhow!("cluster {cluster_name:?} of context {context:?} has no server"))?;
    let ca_data = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) => Some(data.trim().to_owned()),
        (None, Some(path)) => {
            let pem = std::fs::read(path).with_context(|| {
                format!("reading certificate-authority {path} of cluster {cluster_name:?}")
            })?;
            Some(STANDARD.encode(pem))
        }
        (None, None) => None,
    };
    let options = KubeConfigOptions {
        context: Some(context.to_owned()),
        ..KubeConfigOptions::default()
    };
    let config = Config::from_custom_kubeconfig(kubeconfig.clone(), &options)
        .await
        .with_context(|| format!("loading context {context:?} from the kubeconfig"))?;
    Ok(Target {
        context: context.to_owned(),
        server,
        ca_data,
        client: client(config)?,
    })
}

/// A client for `server` that authenticates with a bearer `token`, trusting `ca_data`
/// (base64 PEM): how a peer cluster's credentials are used.
///
/// # Errors
/// When the URL or CA does not parse.
pub async fn token_client(server: &str, ca_data: Option<&str>, token: &str) -> Result<Client> {
    if !server.starts_with("https://") {
        bail!("refusing to send a token to {server:?}: not an https:// URL");
    }
    let mut cluster = serde_json::json!({ "server": server });
    if let Some(ca) = ca_data {
        cluster["certificate-authority-data"] = ca.into();
    }
    let kubeconfig: Kubeconfig = serde_json::from_value(serde_json::json!({
        "clusters": [{ "name": "peer", "cluster": cluster }],
        "users": [{ "name": "peer", "user": { "token": token } }],
        "contexts": [{ "name": "peer", "context": { "cluster": "peer", "user": "peer" } }],
        "current-context": "peer",
    }))
    .context("building a kubeconfig for a token")?;
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("building a client for {server}"))?;
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(READ_TIMEOUT);
    // The peer's API server is not trusted with our memory.
    let builder = kube::client::ClientBuilder::try_from(config)
        .with_context(|| format!("building a client for {server}"))?;
    Ok(builder
        .with_layer(&crate::limit::BodyLimitLayer::new(
            crate::limit::MAX_RESPONSE_BYTES,
        ))
        .build())
}

fn client(mut config: Config) -> Result<Client> {
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(READ_TIMEOUT);
    let url = config.cluster_url.to_string();
    Client::try_from(config).with_context(|| format!("building a client for {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubeconfig() -> Kubeconfig {
        Kubeconfig::from_yaml(
            r"
apiVersion: v1
kind: Config
clusters:
- name: a
  cluster: {server: https://127.0.0.1:1, certificate-authority-data: Q0E=}
contexts:
- name: cluster-a
  context: {cluster: a, user: u}
users:
- name: u
  user: {token: t}
current-context: cluster-a
",
        )
        .unwrap()
    }

    #[test]
    fn the_flag_wins_over_current_context() {
        let kc = kubeconfig();
        assert_eq!(current_context(&kc, None).unwrap(), "cluster-a");
        assert_eq!(current_context(&kc, Some("other")).unwrap(), "other");
        let empty = Kubeconfig::default();
        assert!(current_context(&empty, None).is_err());
    }

    #[tokio::test]
    async fn unknown_contexts_are_named() {
        let err = target(&kubeconfig(), "cluster-b").await.unwrap_err();
        assert!(err.to_string().contains("\"cluster-b\""), "{err}");
        assert!(err.to_string().contains("cluster-a"), "{err}");
    }
}
