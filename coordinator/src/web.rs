//! The Fleet Updates page: plain HTML, CSS and JavaScript compiled into the binary, so the
//! coordinator needs no build step, no CDN and nothing fetched at run time. The page talks to
//! the same operator API as the CLI, signed in with a session cookie (see [`crate::session`]).
//!
//! Everything the page shows that came from the fleet (site and appliance names, error strings)
//! was written by appliances, which may be compromised, so the script only ever inserts it as
//! text; the Content-Security-Policy below is the second line: no inline script, no script from
//! anywhere but this server, no framing (the page has buttons worth clickjacking).

/// One file of the page.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// `GET /fleet-updates`. The page refers to its script, style and the API by relative URLs, so
/// it also works behind a proxy that mounts the coordinator under a path prefix.
pub const PAGE: Asset = Asset {
    path: "/fleet-updates",
    content_type: "text/html; charset=utf-8",
    body: include_str!("web/fleet-updates.html"),
};

pub const SCRIPT: Asset = Asset {
    path: "/fleet-updates/app.js",
    content_type: "text/javascript; charset=utf-8",
    body: include_str!("web/app.js"),
};

pub const STYLE: Asset = Asset {
    path: "/fleet-updates/app.css",
    content_type: "text/css; charset=utf-8",
    body: include_str!("web/app.css"),
};

pub const ASSETS: [Asset; 3] = [PAGE, SCRIPT, STYLE];

/// Sent with every file of the page. `img-src data:` is for the empty favicon, which keeps the
/// browser from asking for `/favicon.ico` (a 404 in the console).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_files_and_no_inline_code() {
        let html = PAGE.body;
        assert!(html.contains(r#"<script src="fleet-updates/app.js" defer></script>"#));
        assert!(html.contains(r#"<link rel="stylesheet" href="fleet-updates/app.css">"#));
        for forbidden in ["http://", "https://", "<style", "onclick=", "javascript:"] {
            assert!(!html.contains(forbidden), "the page must not contain {forbidden:?}");
        }
        assert_eq!(html.matches("<script").count(), 1, "no inline scripts");
        // Fleet data is inserted as text only.
        assert!(!SCRIPT.body.contains("innerHTML"), "use textContent / DOM nodes");
        assert!(!SCRIPT.body.contains("eval("));
        for asset in ASSETS {
            assert!(asset.path.starts_with("/fleet-updates"));
        }
    }
}
