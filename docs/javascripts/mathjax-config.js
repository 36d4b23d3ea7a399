// MathJax reads the math that pymdownx.arithmatex marks (\( \) inline, \[ \] displayed).
// MathJax itself is served from the site (mathjax/, copied at build time by docs/hooks/mathjax.py).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// Material may replace the page without reloading it (navigation.instant): typeset the new one.
// Not the first page: MathJax typesets that itself, and clearing its cache while it does so
// leaves the math blank.
if (typeof document$ !== "undefined") {
  let first = true;
  document$.subscribe(() => {
    if (first) {
      first = false;
      return;
    }
    if (window.MathJax && MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
