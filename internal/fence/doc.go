// Package fence holds no code, only a test: TestImports checks the direct
// imports of every package of the module against one table of which
// packages may import what (STYLE.md section 1), so that the way imports go
// is checked by the tests and not only written down. tundev stays below the
// stack, gVisor stays inside stack, miekg/dns inside dns, proxy on the
// standard library, and the test harness out of the programs.
//
// A new package needs a row in the table; the test says so.
package fence
