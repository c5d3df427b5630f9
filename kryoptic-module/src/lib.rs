//! kryoptic (<https://github.com/latchset/kryoptic>) as a PKCS#11 module.
//!
//! The `kryoptic` crate on crates.io is itself only a `cdylib`, which cannot
//! be a dependency, and it links the system OpenSSL. This crate builds the
//! same shared object from `kryoptic-lib` with OpenSSL vendored (see
//! `Cargo.toml`). All it adds are the three entry points a PKCS#11 loader
//! looks up by name; everything else is reached through the function list.
//!
//! Exporting an unmangled symbol counts as `unsafe_code` (two crates could
//! export the same name); that is the whole point of a module, and the only
//! "unsafe" thing this crate does. No `unsafe` block is written here.

#![allow(unsafe_code)]

use kryoptic_lib::fns::general::{fn_get_function_list, fn_get_interface, fn_get_interface_list};
use kryoptic_lib::pkcs11::{
    CK_FLAGS, CK_FUNCTION_LIST_PTR_PTR, CK_INTERFACE_PTR, CK_INTERFACE_PTR_PTR, CK_RV,
    CK_ULONG_PTR, CK_UTF8CHAR_PTR, CK_VERSION_PTR,
};

/// PKCS#11 `C_GetFunctionList`: the version 2.40 entry point.
#[no_mangle]
pub extern "C" fn C_GetFunctionList(list: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    fn_get_function_list(list)
}

/// PKCS#11 `C_GetInterfaceList`: the 3.x interfaces on offer.
#[no_mangle]
pub extern "C" fn C_GetInterfaceList(interfaces: CK_INTERFACE_PTR, count: CK_ULONG_PTR) -> CK_RV {
    fn_get_interface_list(interfaces, count)
}

/// PKCS#11 `C_GetInterface`: one 3.x interface by name and version.
#[no_mangle]
pub extern "C" fn C_GetInterface(
    name: CK_UTF8CHAR_PTR,
    version: CK_VERSION_PTR,
    interface: CK_INTERFACE_PTR_PTR,
    flags: CK_FLAGS,
) -> CK_RV {
    fn_get_interface(name, version, interface, flags)
}
