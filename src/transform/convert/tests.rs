//! The converter's own tests: every encoding pair, newlines, BOMs, errors
//! with their offsets, and input split across reads.

use super::*;
use std::io::Cursor;

fn spec(from: Charset, to: Charset, newline: Newline) -> Convert {
    Convert {
        from,
        to,
        newline,
        on_error: OnError::Fail,
        bom: false,
    }
}

fn run(spec: &Convert, input: &[u8]) -> Result<(Vec<u8>, Converted), ConvertError> {
    let mut out = Vec::new();
    let c = convert(spec, &mut Cursor::new(input.to_vec()), &mut out)?;
    Ok((out, c))
}

fn enc(cs: Charset, text: &str) -> Vec<u8> {
    match cs {
        Charset::Utf16Le => text.encode_utf16().flat_map(u16::to_le_bytes).collect(),
        Charset::Utf16Be => text.encode_utf16().flat_map(u16::to_be_bytes).collect(),
        _ => {
            let (b, _, bad) = cs.encoding().encode(text);
            assert!(!bad, "{text} in {cs}");
            b.into_owned()
        }
    }
}

const SALES: &str = "売上,数量,ｶﾅ\r\n①,2\r\n東京,3\r\n";

#[test]
fn shift_jis_crlf_becomes_utf8_lf() {
    let sjis = enc(Charset::ShiftJis, SALES);
    // ① is CP932's NEC row 13: 0x87 0x40.
    assert!(sjis.windows(2).any(|w| w == [0x87, 0x40]));
    let (out, c) = run(&spec(Charset::ShiftJis, Charset::Utf8, Newline::Lf), &sjis).unwrap();
    let want = SALES.replace("\r\n", "\n");
    assert_eq!(String::from_utf8(out.clone()).unwrap(), want);
    assert_eq!(c.records, 3);
    assert_eq!(c.size, want.len() as u64);
    assert_eq!(c.sha256, hex::encode(Sha256::digest(want.as_bytes())));
}

#[test]
fn every_encoding_round_trips() {
    let text = "売上,数量\n①,東京\nabc\n";
    let all = [
        Charset::Utf8,
        Charset::ShiftJis,
        Charset::EucJp,
        Charset::Iso2022Jp,
        Charset::Utf16Le,
        Charset::Utf16Be,
    ];
    for from in all {
        for to in all {
            let s = spec(from, to, Newline::Keep);
            let (out, c) = run(&s, &enc(from, text)).unwrap();
            assert_eq!(out, enc(to, text), "{from} -> {to}");
            assert_eq!(c.records, 3);
            let (back, _) = run(&spec(to, from, Newline::Keep), &out).unwrap();
            assert_eq!(back, enc(from, text), "{to} -> {from}");
        }
    }
}

#[test]
fn a_character_split_between_reads_decodes() {
    // A two-byte Shift_JIS character straddles the READ boundary, and
    // a CR LF pair straddles it in the second file.
    let mut sjis = vec![b'a'; READ - 1];
    sjis.extend(enc(Charset::ShiftJis, "売\r\n"));
    let (out, c) = run(&spec(Charset::ShiftJis, Charset::Utf8, Newline::Lf), &sjis).unwrap();
    let mut want = "a".repeat(READ - 1);
    want.push_str("売\n");
    assert_eq!(String::from_utf8(out).unwrap(), want);
    assert_eq!(c.records, 1);
    let mut crlf = vec![b'a'; READ - 1];
    crlf.extend(b"\r\nb\n");
    let (out, c) = run(&spec(Charset::Utf8, Charset::Utf8, Newline::Lf), &crlf).unwrap();
    assert_eq!(out.len(), READ - 1 + 3);
    assert_eq!(&out[READ - 1..], b"\nb\n");
    assert_eq!(c.records, 2);
    // UTF-16 with a surrogate pair split across the boundary.
    let mut u16 = [b'a', 0].repeat((READ - 2) / 2);
    u16.extend(enc(Charset::Utf16Le, "𠮷\n"));
    let (out, _) = run(&spec(Charset::Utf16Le, Charset::Utf8, Newline::Keep), &u16).unwrap();
    assert!(String::from_utf8(out).unwrap().ends_with("a𠮷\n"));
}

#[test]
fn newlines() {
    let s = |n| spec(Charset::Utf8, Charset::Utf8, n);
    let input = b"a\r\nb\nc\rd";
    assert_eq!(run(&s(Newline::Lf), input).unwrap().0, b"a\nb\nc\rd");
    assert_eq!(run(&s(Newline::Crlf), input).unwrap().0, b"a\r\nb\r\nc\rd");
    assert_eq!(run(&s(Newline::Keep), input).unwrap().0, input);
    assert_eq!(run(&s(Newline::Lf), input).unwrap().1.records, 3);
    assert_eq!(run(&s(Newline::Lf), b"").unwrap().1.records, 0);
    assert_eq!(run(&s(Newline::Lf), b"x\r").unwrap().0, b"x\r");
}

#[test]
fn a_bom_is_stripped_and_written_only_when_asked() {
    let s = spec(Charset::Utf8, Charset::Utf8, Newline::Keep);
    assert_eq!(run(&s, b"\xEF\xBB\xBFab\n").unwrap().0, b"ab\n");
    let le = enc(Charset::Utf16Le, "\u{FEFF}売\n");
    let (out, c) = run(
        &spec(Charset::Utf16Le, Charset::ShiftJis, Newline::Keep),
        &le,
    )
    .unwrap();
    assert_eq!(out, enc(Charset::ShiftJis, "売\n"));
    assert_eq!(c.records, 1);
    let with = Convert {
        bom: true,
        ..spec(Charset::ShiftJis, Charset::Utf16Be, Newline::Keep)
    };
    let (out, _) = run(&with, &enc(Charset::ShiftJis, "売")).unwrap();
    assert_eq!(out, [0xFE, 0xFF, 0x58, 0xF2]);
    let with = Convert {
        bom: true,
        ..spec(Charset::ShiftJis, Charset::Utf8, Newline::Keep)
    };
    assert_eq!(run(&with, b"a").unwrap().0, b"\xEF\xBB\xBFa");
}

#[test]
fn an_undecodable_byte_names_its_offset_and_line() {
    let mut sjis = enc(Charset::ShiftJis, "売上\r\n数量\r\n");
    let at = sjis.len();
    sjis.extend([b'x', 0x81, 0x20, b'\r', b'\n']);
    let s = spec(Charset::ShiftJis, Charset::Utf8, Newline::Lf);
    match run(&s, &sjis) {
        Err(ConvertError::Undecodable { offset, line, .. }) => {
            assert_eq!((offset, line), (at as u64 + 1, 3));
        }
        other => panic!("{other:?}"),
    }
    let r = Convert {
        on_error: OnError::Replace,
        ..s
    };
    let (out, _) = run(&r, &sjis).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "売上\n数量\nx\u{FFFD} \n");
}

#[test]
fn an_unmappable_character_names_its_offset_and_line() {
    let text = "ab\n売上\nc😀d\n";
    let s = spec(Charset::Utf8, Charset::ShiftJis, Newline::Keep);
    match run(&s, text.as_bytes()) {
        Err(ConvertError::Unmappable {
            offset, line, ch, ..
        }) => {
            assert_eq!(offset, text.find('😀').unwrap() as u64);
            assert_eq!(line, 3);
            assert!(ch.contains("U+1F600"), "{ch}");
        }
        other => panic!("{other:?}"),
    }
    let r = Convert {
        on_error: OnError::Replace,
        ..s
    };
    let (out, _) = run(&r, text.as_bytes()).unwrap();
    assert_eq!(out, enc(Charset::ShiftJis, "ab\n売上\nc?d\n"));
}
