//! What can go wrong, sorted by the exit code an operator's script sees.

/// A failure, carrying its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The cluster or an agent refused, or the operation failed: exit 1.
    #[error("{0}")]
    Refused(String),
    /// Bad arguments or config: exit 2.
    #[error("{0}")]
    Usage(String),
    /// etcd or the agents could not be reached: exit 3.
    #[error("{0}")]
    Unreachable(String),
}

impl CtlError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Refused(_) => 1,
            CtlError::Usage(_) => 2,
            CtlError::Unreachable(_) => 3,
        }
    }

    /// Sorts a gRPC refusal by what the operator must do about it.
    pub fn from_status(agent: &str, status: tonic::Status) -> Self {
        use tonic::Code;
        let message = status.message().to_owned();
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded => {
                CtlError::Unreachable(format!("{agent}: {message}"))
            }
            Code::InvalidArgument | Code::Unauthenticated => CtlError::Usage(message),
            _ => CtlError::Refused(message),
        }
    }
}
