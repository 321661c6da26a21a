//! The container init's last step: libcontainer's default executor (which
//! execs the app) preceded by loading the app's seccomp filter.
//!
//! It runs inside the container after pivot_root, the capability drop and
//! no_new_privileges, so the filter never sees libcontainer's own set-up
//! calls (mount, pivot_root, capset...) and only the app's calls are checked;
//! the few calls between the load and the app's first instruction (execve,
//! the path lookup) are allowed by every profile.

use crate::seccomp::Insn;
use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use std::sync::Arc;

#[derive(Clone)]
pub struct SandboxExecutor {
    /// `None`: the app runs unconfined.
    seccomp: Option<Arc<[Insn]>>,
}

impl SandboxExecutor {
    pub fn new(seccomp: Option<Vec<Insn>>) -> SandboxExecutor {
        SandboxExecutor { seccomp: seccomp.map(Arc::from) }
    }
}

impl Executor for SandboxExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(filter) = &self.seccomp {
            crate::sys::install_seccomp(filter).map_err(|e| {
                ExecutorError::Other(if e.raw_os_error() == Some(libc::EACCES) {
                    "the seccomp filter needs no_new_privileges or CAP_SYS_ADMIN: \
                     set security.seccomp = \"unconfined\" for this app"
                        .to_string()
                } else {
                    format!("loading the seccomp filter: {e}")
                })
            })?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}
