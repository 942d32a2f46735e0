//! `jaictl.yaml`: which cluster, where its etcd is, where the control token is.

use crate::error::CtlError;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtlConfig {
    /// The cluster's name (its keys live under `/jai/<cluster>/`).
    pub cluster: String,
    /// How to reach etcd.
    pub etcd: EtcdConfig,
    /// File whose first line is the control token; needed only to change
    /// the cluster (switchover, pause, config set…).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// How long one request to etcd or an agent may take.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// How to reach etcd.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

impl CtlConfig {
    /// Loads the file named by `-c`/`JAICTL_CONFIG`, else the default one,
    /// then applies the command-line overrides. Without any file, flags alone
    /// (`--cluster`, `--etcd`) are enough for the reading commands.
    pub fn load(
        file: Option<&Path>,
        etcd: &[String],
        cluster: Option<&str>,
    ) -> Result<Self, CtlError> {
        let default_file = std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".config/jai/jaictl.yaml"));
        let mut config = match (file, default_file) {
            (Some(file), _) => Some(Self::read(file)?),
            (None, Some(default)) if default.exists() => Some(Self::read(&default)?),
            _ => None,
        };
        match (&mut config, cluster) {
            (Some(config), Some(cluster)) => config.cluster = cluster.to_owned(),
            (None, Some(cluster)) if !etcd.is_empty() => {
                config = Some(Self {
                    cluster: cluster.to_owned(),
                    etcd: EtcdConfig {
                        endpoints: etcd.to_vec(),
                    },
                    token_file: None,
                    timeout: default_timeout(),
                })
            }
            _ => {}
        }
        let mut config = config.ok_or_else(|| {
            CtlError::Usage(
                "no config: pass -c FILE, set JAICTL_CONFIG, create ~/.config/jai/jaictl.yaml, \
                 or give both --cluster and --etcd"
                    .into(),
            )
        })?;
        if !etcd.is_empty() {
            config.etcd.endpoints = etcd.to_vec();
        }
        config.validate()?;
        Ok(config)
    }

    fn read(file: &Path) -> Result<Self, CtlError> {
        let text = std::fs::read_to_string(file).map_err(|error| {
            CtlError::Usage(format!("{}: cannot read: {error}", file.display()))
        })?;
        serde_saphyr::from_str(&text)
            .map_err(|error| CtlError::Usage(format!("{}: {error}", file.display())))
    }

    fn validate(&self) -> Result<(), CtlError> {
        if self.etcd.endpoints.is_empty() {
            return Err(CtlError::Usage(
                "etcd.endpoints: needs at least one URL".into(),
            ));
        }
        for (index, url) in self.etcd.endpoints.iter().enumerate() {
            if !url.starts_with("http://") {
                return Err(CtlError::Usage(format!(
                    "etcd.endpoints[{index}]: {url:?} is not an http:// URL"
                )));
            }
        }
        Ok(())
    }

    /// The control token, for the commands that change the cluster.
    pub fn token(&self) -> Result<String, CtlError> {
        let file = self.token_file.as_ref().ok_or_else(|| {
            CtlError::Usage(
                "token_file: this command changes the cluster and needs the control token; \
                 set token_file in the config"
                    .into(),
            )
        })?;
        let text = std::fs::read_to_string(file).map_err(|error| {
            CtlError::Usage(format!(
                "token_file: cannot read {}: {error}",
                file.display()
            ))
        })?;
        let token = text.lines().next().unwrap_or_default().trim().to_owned();
        if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(CtlError::Usage(format!(
                "token_file: {} must hold the token on its first line (printable ASCII, no spaces)",
                file.display()
            )));
        }
        Ok(token)
    }
}
