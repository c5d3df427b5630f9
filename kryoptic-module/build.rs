//! Links the module with `-z nodelete`: once loaded, it stays loaded.
//!
//! The statically linked OpenSSL registers thread-specific-data destructors
//! (`pthread_key_create`) in every thread that calls into it. If a process
//! unloaded the module (`dlclose`, which cryptoki does when its context is
//! dropped) while such a thread lived on, the thread's exit would jump into
//! unmapped code: a vault node that refused to start (rolled-back store)
//! crashed with SIGSEGV as its thread pool shut down, before printing why.
//! A shared OpenSSL guards against this the same way (`OPENSSL_USE_NODELETE`).

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    println!("cargo:rerun-if-changed=build.rs");
}
