#![no_main]
//! See crmcube::fuzzing::csv_clean.
libfuzzer_sys::fuzz_target!(|data: &[u8]| crmcube::fuzzing::csv_clean(data));
