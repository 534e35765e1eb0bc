#![no_main]
//! See crmcube::fuzzing::metadata.
libfuzzer_sys::fuzz_target!(|data: &[u8]| crmcube::fuzzing::metadata(data));
