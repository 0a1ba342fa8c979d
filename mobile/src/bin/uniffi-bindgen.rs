//! The crate's own `uniffi-bindgen`: generates Kotlin, Swift and Python bindings from the built
//! library (`generate --library target/…/libcredproxy_mobile.so --language kotlin --out-dir DIR`).

fn main() {
    uniffi::uniffi_bindgen_main()
}
