//! Reading the headers of a record another producer may have written.

/// The headers of a consumed record, names and values as raw bytes, in the record's order.
///
/// rdkafka's own accessor panics on a header name that is not UTF-8; a record from any producer
/// may carry one, so whatever reads other producers' records (the read-back, ingest) reads them
/// through this.
pub fn raw_headers<'m>(
    msg: &'m rdkafka::message::BorrowedMessage<'_>,
) -> Vec<(&'m [u8], Option<&'m [u8]>)> {
    use rdkafka::bindings as rd;
    let mut out = Vec::new();
    let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `msg.ptr()` is a live message for the lifetime 'm; librdkafka returns a pointer to
    // headers owned by that message (not to be freed), or an error when there are none.
    let err = unsafe { rd::rd_kafka_message_headers(msg.ptr(), &mut headers) };
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
        return out;
    }
    // SAFETY: `headers` belongs to the message, which outlives 'm.
    let count = unsafe { rd::rd_kafka_header_cnt(headers) };
    for idx in 0..count {
        let mut name: *const std::os::raw::c_char = std::ptr::null();
        let mut value: *const std::os::raw::c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: idx < count; the out pointers point at locals.
        let err =
            unsafe { rd::rd_kafka_header_get_all(headers, idx, &mut name, &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka keeps a NUL-terminated name and `size` value bytes in the message's
        // header list, alive as long as the message.
        let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes();
        let value = (!value.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) });
        out.push((name, value));
    }
    out
}
