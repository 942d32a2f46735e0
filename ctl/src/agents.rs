//! Calls to the agents' gRPC control API, with the control token.

use crate::cluster::ClusterState;
use crate::config::CtlConfig;
use crate::error::CtlError;
use jai_grpc::control_client::ControlClient;
use jai_proto::MemberStatus;
use tonic::transport::{Channel, Endpoint};

/// A connection to one agent, ready for authenticated calls.
pub struct Agent {
    /// The member the agent supervises.
    pub name: String,
    client: ControlClient<Channel>,
    token: String,
}

impl Agent {
    /// Connects to `member`'s control API.
    pub async fn connect(
        config: &CtlConfig,
        member: &MemberStatus,
        token: &str,
    ) -> Result<Self, CtlError> {
        let url = member.grpc_url.clone().ok_or_else(|| {
            CtlError::Refused(format!(
                "{} serves no control API (no grpc section in its agent config)",
                member.name
            ))
        })?;
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|error| CtlError::Refused(format!("{}: bad URL {url}: {error}", member.name)))?
            .connect_timeout(config.timeout)
            .timeout(config.timeout * 12);
        let channel = endpoint.connect().await.map_err(|error| {
            CtlError::Unreachable(format!(
                "{}'s agent unreachable at {url} ({error}): is jai-agent running there?",
                member.name
            ))
        })?;
        Ok(Self {
            name: member.name.clone(),
            client: ControlClient::new(channel),
            token: token.to_owned(),
        })
    }

    /// Connects to the first agent that answers, the leader's first: calls
    /// that only write etcd may go to any agent.
    pub async fn any(
        config: &CtlConfig,
        state: &ClusterState,
        token: &str,
    ) -> Result<Self, CtlError> {
        let mut members: Vec<&MemberStatus> = state.members.iter().collect();
        members.sort_by_key(|member| Some(member.name.as_str()) != state.leader.as_deref());
        let mut failures = Vec::new();
        for member in members {
            match Self::connect(config, member, token).await {
                Ok(agent) => return Ok(agent),
                Err(error) => failures.push(error.to_string()),
            }
        }
        Err(CtlError::Unreachable(format!(
            "no agent of cluster {} answered: {}",
            state.cluster,
            failures.join("; ")
        )))
    }

    /// The client, and a request carrying the token.
    pub fn call<T>(&mut self, message: T) -> (&mut ControlClient<Channel>, tonic::Request<T>) {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", self.token)
            .parse()
            .expect("a token read from a file is valid header text");
        request.metadata_mut().insert("authorization", value);
        (&mut self.client, request)
    }

    /// Maps a refusal from this agent to an exit code.
    pub fn refused(&self, status: tonic::Status) -> CtlError {
        CtlError::from_status(&self.name, status)
    }
}
