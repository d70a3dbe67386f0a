package main

import (
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/term"
)

// display shows a pull's progress. On a terminal, Nix's build log runs on
// one status line that each new log line replaces, between the steps
// (packages, layers with digest and size, time), which stay; elsewhere
// (a log file, CI) every line is printed as it comes.
type display struct {
	mu     sync.Mutex
	w      io.Writer
	width  int // terminal columns; 0 when not a terminal
	status bool
}

func newDisplay(w io.Writer) *display {
	d := &display{w: w}
	if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		if cols, _, err := term.GetSize(int(f.Fd())); err == nil && cols > 10 {
			d.width = cols
		}
	}
	return d
}

// nix shows one line of Nix's log.
func (d *display) nix(line string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.width == 0 {
		fmt.Fprintln(d.w, "  nix:", line)
		return
	}
	line = "  nix: " + line
	if r := []rune(line); len(r) > d.width-1 {
		line = string(r[:d.width-2]) + "…"
	}
	fmt.Fprint(d.w, "\r\033[K"+line)
	d.status = true
}

// Write prints whole lines of progress, clearing the status line first.
func (d *display) Write(p []byte) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.status {
		fmt.Fprint(d.w, "\r\033[K")
		d.status = false
	}
	return d.w.Write(p)
}

// done clears the status line.
func (d *display) done() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.status {
		fmt.Fprint(d.w, "\r\033[K")
		d.status = false
	}
}
