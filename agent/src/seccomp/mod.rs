//! The default seccomp filter, in pure Rust (no libseccomp).
//!
//! `profile.rs` is Docker's default profile as data, `bpf.rs` compiles it for
//! every architecture the host can run, `syscalls.rs` maps names to numbers.
//! Everything here is pure: loading the program is `sys::install_seccomp`,
//! done by the container's init right before exec (`runtime::executor`).
//!
//! Architectures per host build: x86_64 checks x86_64 calls; aarch64 checks
//! aarch64 calls and, separately, the 32-bit ARM (armhf) calls of compat
//! binaries; armv7 checks ARM calls. Any other architecture is killed.

mod bpf;
pub mod profile;
mod syscalls;

pub use profile::CapSet;

/// An architecture as seccomp reports it in `seccomp_data.arch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    X86_64,
    Aarch64,
    /// 32-bit ARM EABI, native on armv7 or compat on aarch64.
    Arm,
}

impl Arch {
    /// `AUDIT_ARCH_*` from linux/audit.h.
    pub fn audit(self) -> u32 {
        match self {
            Arch::X86_64 => 0xC000_003E,
            Arch::Aarch64 => 0xC000_00B7,
            Arch::Arm => 0x4000_0028,
        }
    }

    pub fn is_64bit(self) -> bool {
        !matches!(self, Arch::Arm)
    }

    /// The architectures a process on this host can use.
    pub fn host() -> &'static [Arch] {
        #[cfg(target_arch = "x86_64")]
        return &[Arch::X86_64];
        #[cfg(target_arch = "aarch64")]
        return &[Arch::Aarch64, Arch::Arm];
        #[cfg(target_arch = "arm")]
        return &[Arch::Arm];
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")))]
        return &[];
    }

    fn table(self) -> &'static [(&'static str, u32)] {
        match self {
            #[cfg(any(target_arch = "x86_64", test))]
            Arch::X86_64 => syscalls::X86_64,
            #[cfg(any(target_arch = "aarch64", test))]
            Arch::Aarch64 => syscalls::AARCH64,
            #[cfg(any(target_arch = "aarch64", target_arch = "arm", test))]
            Arch::Arm => syscalls::ARM,
            #[allow(unreachable_patterns)]
            _ => &[],
        }
    }

    /// The number of syscall `name`, if this architecture has it.
    pub fn syscall(self, name: &str) -> Option<u32> {
        let t = self.table();
        t.binary_search_by(|(n, _)| (*n).cmp(name)).ok().map(|i| t[i].1)
    }
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// The kernel's limit on a filter's length (BPF_MAXINSNS).
pub const MAX_INSNS: usize = 4096;

/// A compiled filter and the capabilities it was resolved against.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Filter {
    pub caps: CapSet,
    /// The program, 8 bytes per instruction (code, jt, jf, k; little-endian), hex.
    program: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("seccomp program is not whole instructions of hex")]
    Encoding,
    #[error("seccomp program has {0} instructions (1 to {MAX_INSNS} allowed)")]
    Length(usize),
}

impl Filter {
    /// Docker's default profile for `arches` and an app with `caps`.
    pub fn compile(arches: &[Arch], caps: CapSet) -> Filter {
        let sections: Vec<_> = arches.iter().map(|a| (*a, profile::resolve(*a, caps))).collect();
        let insns = bpf::compile(&sections);
        let mut program = String::with_capacity(insns.len() * 16);
        for i in &insns {
            let mut b = [0u8; 8];
            b[0..2].copy_from_slice(&i.code.to_le_bytes());
            b[2] = i.jt;
            b[3] = i.jf;
            b[4..8].copy_from_slice(&i.k.to_le_bytes());
            program.push_str(&hex::encode(b));
        }
        Filter { caps, program }
    }

    pub fn insns(&self) -> Result<Vec<Insn>, FilterError> {
        let bytes = hex::decode(&self.program).map_err(|_| FilterError::Encoding)?;
        if bytes.len() % 8 != 0 {
            return Err(FilterError::Encoding);
        }
        let n = bytes.len() / 8;
        if n == 0 || n > MAX_INSNS {
            return Err(FilterError::Length(n));
        }
        Ok(bytes
            .chunks_exact(8)
            .map(|b| Insn {
                code: u16::from_le_bytes([b[0], b[1]]),
                jt: b[2],
                jf: b[3],
                k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests;
